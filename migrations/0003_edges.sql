-- Edges: anomalies ops must look at, partner outcomes not known yet, card-key expiry buckets.

CREATE TABLE anomalies (
    id         bigserial PRIMARY KEY,
    kind       text NOT NULL,
    claim_id   text NOT NULL,
    benefit_id text,
    detail     jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (kind, claim_id)
);
CREATE INDEX anomalies_created ON anomalies (created_at);

ALTER TABLE claims
    -- set while no partner answer tells whether the order was charged (never refunded blind)
    ADD COLUMN outcome_unknown_since timestamptz,
    -- card-key claims: the expiry (unix ms, 0 = never) of the code bucket the claim reserved
    ADD COLUMN code_expiry_ms bigint;
CREATE INDEX claims_outcome_unknown ON claims (outcome_unknown_since)
    WHERE outcome_unknown_since IS NOT NULL;
CREATE INDEX voucher_codes_fefo ON voucher_codes (benefit_id, option_id, expires_at, code_id)
    WHERE claim_id IS NULL;
