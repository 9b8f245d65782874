-- citytel 0011: readings' time index becomes a BRIN. The B-tree TimescaleDB creates on
-- (time DESC) cost a write 35-55 % more PostgreSQL CPU per COPYed reading (`citytel bench
-- copy-order`); readings arrive nearly in time order, so a BRIN (a min and max per block range)
-- serves the time-range scans (rollups, the last-hour views) for a fraction of that. Per-series
-- reads use the natural key, (series_id, time DESC). autosummarize: autovacuum summarizes each
-- block range once it is full, so the ranges a scan cannot rule out stay the newest minute or so.
--
-- One query needed the B-tree: the alerter's newest reading, max(time) over every chunk. The
-- sink now keeps it here, raised in the transaction that writes the readings.
CREATE TABLE readings_newest (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    time     timestamptz NOT NULL
);
INSERT INTO readings_newest (time) SELECT max(time) FROM readings WHERE time <= now() HAVING max(time) IS NOT NULL;

DROP INDEX IF EXISTS readings_time_idx;
CREATE INDEX readings_time_brin ON readings USING brin (time) WITH (autosummarize = on);
