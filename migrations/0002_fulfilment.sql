-- Fulfilment: claim states with an event trail, card-key pools, direct-charge partners.

ALTER TABLE benefits
    ADD COLUMN on_failure text NOT NULL DEFAULT 'refund' CHECK (on_failure IN ('refund', 'hold'));

CREATE TABLE partners (
    partner_id    text PRIMARY KEY,
    base_url      text NOT NULL,
    secret_enc    bytea NOT NULL,
    timeout_s     double precision NOT NULL,
    max_in_flight integer NOT NULL,
    max_attempts  integer NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE voucher_codes (
    code_id     bigserial PRIMARY KEY,
    benefit_id  text NOT NULL,
    option_id   text NOT NULL,
    code_enc    bytea NOT NULL,
    secret_enc  bytea,
    code_hash   bytea NOT NULL,
    expires_at  timestamptz,
    claim_id    text UNIQUE,
    assigned_at timestamptz,
    loaded_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (benefit_id, option_id, code_hash)
);
CREATE INDEX voucher_codes_free ON voucher_codes (benefit_id, option_id, code_id)
    WHERE claim_id IS NULL;

ALTER TABLE claims
    ADD COLUMN attempts        integer NOT NULL DEFAULT 0,
    ADD COLUMN next_attempt_at timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN lease_owner     text,
    ADD COLUMN lease_until     timestamptz,
    ADD COLUMN partner_ref     text,
    ADD COLUMN code_id         bigint REFERENCES voucher_codes (code_id),
    ADD COLUMN failure_reason  text,
    ADD COLUMN updated_at      timestamptz NOT NULL DEFAULT now(),
    ADD CONSTRAINT claims_status_check
        CHECK (status IN ('accepted', 'fulfilling', 'fulfilled', 'failed', 'refunded'));
CREATE INDEX claims_due ON claims (next_attempt_at)
    WHERE status IN ('accepted', 'fulfilling');
CREATE INDEX claims_failed ON claims (benefit_id) WHERE status = 'failed';

CREATE TABLE claim_events (
    id          bigserial PRIMARY KEY,
    claim_id    text NOT NULL,
    from_status text,
    to_status   text NOT NULL,
    reason      text NOT NULL,
    detail      jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX claim_events_claim ON claim_events (claim_id, id);
