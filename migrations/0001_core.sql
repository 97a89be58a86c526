-- Core schema: the catalogue (source of truth, pushed to Redis), tier snapshots, stock
-- top-ups and one row per accepted claim.

CREATE TABLE benefits (
    benefit_id       text PRIMARY KEY,
    name             text NOT NULL,
    min_tier         integer NOT NULL,
    quota            jsonb NOT NULL,
    stock_per_period integer NOT NULL CHECK (stock_per_period >= 0),
    release          jsonb NOT NULL,
    paused           boolean NOT NULL DEFAULT false,
    version          bigint NOT NULL DEFAULT 1,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE benefit_options (
    benefit_id text NOT NULL REFERENCES benefits (benefit_id) ON DELETE CASCADE,
    option_id  text NOT NULL,
    position   integer NOT NULL,
    name       text NOT NULL,
    kind       text NOT NULL CHECK (kind IN ('direct_charge', 'card_key')),
    partner    text,
    sku        text,
    stock_cap  integer CHECK (stock_cap >= 0),
    PRIMARY KEY (benefit_id, option_id)
);

CREATE TABLE stock_additions (
    id         bigserial PRIMARY KEY,
    benefit_id text NOT NULL REFERENCES benefits (benefit_id) ON DELETE CASCADE,
    period     text NOT NULL,
    amount     integer NOT NULL CHECK (amount > 0),
    note       text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX stock_additions_benefit_period ON stock_additions (benefit_id, period);

CREATE TABLE tiers (
    period  text NOT NULL,
    user_id text NOT NULL,
    tier    integer NOT NULL CHECK (tier >= 0),
    PRIMARY KEY (period, user_id)
);

CREATE TABLE claims (
    claim_id   text PRIMARY KEY,
    request_id text NOT NULL,
    user_id    text NOT NULL,
    benefit_id text NOT NULL,
    option_id  text NOT NULL,
    period     text NOT NULL,
    tier       integer NOT NULL,
    status     text NOT NULL DEFAULT 'accepted',
    account    text,
    created_at timestamptz NOT NULL,
    written_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX claims_user_period ON claims (user_id, period);
CREATE INDEX claims_benefit_period ON claims (benefit_id, period);
CREATE UNIQUE INDEX claims_request ON claims (benefit_id, period, user_id, request_id);
