-- citytel 0012: detector state checkpoints compressed with lz4, not pglz (PostgreSQL's
-- default). A partition's state is an .npz of megabytes, mostly float64 arrays; every 30 s a
-- processor saves each of its partitions, and pglz made each save a burst of the database's
-- CPU that the readings' writes waited behind. `citytel bench checkpoint` (a week of the
-- simulated city): 5.1 MB of state, 88 ms of the database's CPU a save with pglz, 25 ms with
-- lz4, for the same stored size (docs/bench/design-measurements.md).
-- A server built without lz4 stores the state uncompressed instead.
-- Rows saved before keep their pglz form until their next save; reads take either.
DO $$
BEGIN
    ALTER TABLE detector_state ALTER COLUMN state SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    ALTER TABLE detector_state ALTER COLUMN state SET STORAGE EXTERNAL;
END
$$;
