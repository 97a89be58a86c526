-- Waiting rooms: a benefit's room settings, and the secret seed that shuffles each period's
-- pre-queue (sealed like a draw's seed; its SHA-256 published when the pre-queue opens, the
-- seed itself once the opening has passed). Never replaced, kept at least 90 days.

ALTER TABLE benefits ADD COLUMN waiting_room jsonb;

CREATE TABLE room_seeds (
    benefit_id  text NOT NULL,
    period      text NOT NULL,
    sealed      bytea NOT NULL,
    commitment  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (benefit_id, period)
);

CREATE FUNCTION room_seeds_keep() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        RAISE EXCEPTION 'waiting-room seeds are immutable';
    END IF;
    IF OLD.created_at > now() - interval '90 days' THEN
        RAISE EXCEPTION 'waiting-room seeds are kept at least 90 days';
    END IF;
    RETURN OLD;
END $$;
CREATE TRIGGER room_seeds_keep BEFORE UPDATE OR DELETE ON room_seeds
    FOR EACH ROW EXECUTE FUNCTION room_seeds_keep();
