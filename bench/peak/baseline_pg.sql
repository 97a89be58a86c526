-- Baseline (d) of `./run bench peak`: a PostgreSQL-only claim service's two tables.
-- Each claim is one transaction: a conditional UPDATE of the benefit's stock row, then an
-- INSERT of the claim (unique per member and request, as the real `claims` table).
CREATE TABLE IF NOT EXISTS bench_peak_stock (
    benefit_id  text PRIMARY KEY,
    units_left  integer NOT NULL CHECK (units_left >= 0)
);
CREATE TABLE IF NOT EXISTS bench_peak_claims (
    claim_id    text PRIMARY KEY,
    benefit_id  text NOT NULL,
    user_id     text NOT NULL,
    request_id  text NOT NULL,
    option_id   text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (benefit_id, user_id, request_id)
);
