-- Sharded stock: a benefit's period stock split over buckets on several Redis slots
-- (claim_service/domain/shards.py). Fixed when the benefit is created: members are routed
-- to a bucket by their id, and a new count would move them away from their quota.
ALTER TABLE benefits
    ADD COLUMN shards integer NOT NULL DEFAULT 1 CHECK (shards BETWEEN 1 AND 64);
