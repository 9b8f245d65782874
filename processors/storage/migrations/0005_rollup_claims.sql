-- citytel 0005: rollup buckets claimed for recomputation move out of rollup_dirty at once, so a
-- sink marking the same minute never waits for a whole recomputation (only for the claim). A
-- pass that dies mid-way leaves its claims here for the next pass.
CREATE TABLE rollup_claimed (
    bucket     timestamptz PRIMARY KEY,
    claimed_at timestamptz NOT NULL DEFAULT now()
);
