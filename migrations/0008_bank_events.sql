-- Events from the bank's core systems (POST /v1/events, signed with CLAIM_EVENTS_SECRET):
-- an account opened, a wallet, a pension account, a card activated, a first swipe, a
-- wealth task done, an account closed. Kept as received, once per event_id.
CREATE TABLE bank_events (
    event_id     text PRIMARY KEY,
    type         text NOT NULL,
    user_id      text NOT NULL,
    occurred_at  timestamptz NOT NULL,
    attrs        jsonb NOT NULL DEFAULT '{}',
    received_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX bank_events_member ON bank_events (user_id, type, occurred_at DESC);
CREATE INDEX bank_events_type ON bank_events (type, occurred_at DESC);

-- A benefit only members with a recent event may claim: {"event": TYPE, "within_days": N}.
ALTER TABLE benefits ADD COLUMN eligibility jsonb;
