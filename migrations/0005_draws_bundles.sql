-- Multi-choice bundles and draws (blind box, nine-grid, lucky bag).
--
-- A bundle claim is one row per chosen option: the first carries the claim id the member is
-- given (bundle_id = claim_id), the others derived ids; all share bundle_id and the member's
-- request_id, so the request is unique among first items only.

ALTER TABLE benefits
    ADD COLUMN choose integer NOT NULL DEFAULT 1 CHECK (choose >= 1),
    ADD COLUMN draw   jsonb;

ALTER TABLE claims
    ADD COLUMN bundle_id   text,
    ADD COLUMN bundle_item smallint NOT NULL DEFAULT 0 CHECK (bundle_item >= 0),
    ADD COLUMN bundle_size smallint NOT NULL DEFAULT 1 CHECK (bundle_size >= 1);
CREATE INDEX claims_bundle ON claims (bundle_id) WHERE bundle_id IS NOT NULL;
DROP INDEX claims_request;
CREATE UNIQUE INDEX claims_request ON claims (benefit_id, period, user_id, request_id)
    WHERE bundle_item = 0;

-- The secret seed of a benefit's draws in one period: sealed (AES-256-GCM under
-- CLAIM_CODES_KEY), its SHA-256 published from creation, the seed itself once the period
-- closed. Never replaced: the first one made for a benefit and period is the one used.
CREATE TABLE draw_seeds (
    benefit_id  text NOT NULL,
    period      text NOT NULL,
    sealed      bytea NOT NULL,
    commitment  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (benefit_id, period)
);

-- One record per draw, written with the claim row: the proof's inputs (member, request,
-- nonce), the value, the prizes and weights in force when it was decided, the result, and
-- the member's pity count. Immutable; kept at least 90 days (a trigger refuses changes, and
-- deletions of records younger than that).
CREATE TABLE draws (
    claim_id     text PRIMARY KEY,
    benefit_id   text NOT NULL,
    period       text NOT NULL,
    user_id      text NOT NULL,
    request_id   text NOT NULL,
    nonce        integer NOT NULL,
    value        bigint NOT NULL,
    weights      text NOT NULL,
    prize_id     text NOT NULL,
    owed         boolean NOT NULL,
    streak       integer NOT NULL,
    seq          bigint NOT NULL,
    created_at   timestamptz NOT NULL
);
CREATE INDEX draws_benefit_period ON draws (benefit_id, period, seq);

CREATE FUNCTION draws_keep() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        RAISE EXCEPTION 'draw records are immutable';
    END IF;
    IF OLD.created_at > now() - interval '90 days' THEN
        RAISE EXCEPTION 'draw records are kept at least 90 days';
    END IF;
    RETURN OLD;
END $$;
CREATE TRIGGER draws_keep BEFORE UPDATE OR DELETE ON draws
    FOR EACH ROW EXECUTE FUNCTION draws_keep();

-- A committed seed is never replaced nor removed while its records must be kept.
CREATE FUNCTION draw_seeds_keep() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        RAISE EXCEPTION 'draw seeds are immutable';
    END IF;
    IF OLD.created_at > now() - interval '90 days' THEN
        RAISE EXCEPTION 'draw seeds are kept at least 90 days';
    END IF;
    RETURN OLD;
END $$;
CREATE TRIGGER draw_seeds_keep BEFORE UPDATE OR DELETE ON draw_seeds
    FOR EACH ROW EXECUTE FUNCTION draw_seeds_keep();
