-- Zones of the catalogue, benefits priced in points, and the points ledger.
--
-- The ledger is append-only: entries and their allocations are never updated or deleted (a
-- trigger refuses it). A member's balance is the sum of their entries; a lot's remaining
-- points the sum of its allocations. Every entry carries a unique reference, so repeating a
-- call never writes a second entry.

CREATE TABLE zones (
    zone_id    text PRIMARY KEY,
    name       text NOT NULL,
    min_tier   integer NOT NULL CHECK (min_tier >= 0),
    position   integer NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE benefits
    ADD COLUMN zone         text,
    ADD COLUMN price_points integer NOT NULL DEFAULT 0 CHECK (price_points >= 0);
ALTER TABLE benefit_options
    ADD COLUMN price_points integer CHECK (price_points >= 0);

-- Crediting rules: a ladder by tier (the step with the highest min_tier at or below the
-- member's tier applies), replaced as a whole by PUT /admin/v1/points/rules.
CREATE TABLE points_rules (
    min_tier              integer PRIMARY KEY CHECK (min_tier >= 0),
    points                integer NOT NULL CHECK (points >= 0),
    expires_after_periods integer CHECK (expires_after_periods > 0),
    updated_at            timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE points_entries (
    entry_id   bigserial PRIMARY KEY,
    user_id    text NOT NULL,
    amount     integer NOT NULL CHECK (amount <> 0),
    kind       text NOT NULL CHECK (kind IN ('credit', 'debit', 'refund', 'expire', 'adjust')),
    reference  text NOT NULL UNIQUE,
    reason     text NOT NULL,
    claim_id   text,          -- debit and refund: the claim
    period     text,          -- credit: the period credited
    created_at timestamptz NOT NULL DEFAULT now(),
    CHECK ((kind IN ('debit', 'refund')) = (claim_id IS NOT NULL)),
    CHECK (kind NOT IN ('debit', 'expire') OR amount < 0),
    CHECK (kind NOT IN ('credit', 'refund') OR amount > 0)
);
CREATE INDEX points_entries_user ON points_entries (user_id, entry_id);
CREATE INDEX points_entries_created ON points_entries (created_at);
-- One debit and at most one refund per claim.
CREATE UNIQUE INDEX points_entries_claim ON points_entries (claim_id, kind)
    WHERE claim_id IS NOT NULL;

-- A lot: the points one credit (or positive adjustment) brought, with their expiry.
CREATE TABLE points_lots (
    lot_id     bigint PRIMARY KEY REFERENCES points_entries (entry_id),
    user_id    text NOT NULL,
    expires_at timestamptz      -- NULL: never
);
CREATE INDEX points_lots_user ON points_lots (user_id, expires_at);
CREATE INDEX points_lots_expiry ON points_lots (expires_at) WHERE expires_at IS NOT NULL;

-- Which lots an entry moved points in or out of; an entry's allocations sum to its amount.
CREATE TABLE points_allocations (
    entry_id bigint NOT NULL REFERENCES points_entries (entry_id),
    lot_id   bigint NOT NULL REFERENCES points_lots (lot_id),
    amount   integer NOT NULL CHECK (amount <> 0),
    PRIMARY KEY (entry_id, lot_id)
);
CREATE INDEX points_allocations_lot ON points_allocations (lot_id);

CREATE FUNCTION points_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the points ledger is append-only (% on %)', TG_OP, TG_TABLE_NAME;
END $$;
CREATE TRIGGER points_entries_append_only BEFORE UPDATE OR DELETE ON points_entries
    FOR EACH ROW EXECUTE FUNCTION points_append_only();
CREATE TRIGGER points_allocations_append_only BEFORE UPDATE OR DELETE ON points_allocations
    FOR EACH ROW EXECUTE FUNCTION points_append_only();
CREATE TRIGGER points_lots_append_only BEFORE UPDATE OR DELETE ON points_lots
    FOR EACH ROW EXECUTE FUNCTION points_append_only();
