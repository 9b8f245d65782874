-- citytel 0009: the city's data-sharing interface (`citytel api`, SensorThings API): who may
-- read what, and a record of every request for the data bureau's audit.

-- One row per department or outside party. Its key is 32 random bytes shown once; only the
-- key's SHA-256 is kept (a random key needs no slow hash: there is nothing to guess).
CREATE TABLE api_clients (
    client_id       text PRIMARY KEY,
    key_hash        bytea UNIQUE,
    -- What it may read; NULL: every kind / district / metric.
    kinds           text[],
    districts       text[],
    metrics         text[],
    -- false: only rollups and anomalies, never a single raw reading
    raw             boolean NOT NULL DEFAULT true,
    rate_per_second real CHECK (rate_per_second > 0),
    burst           integer CHECK (burst >= 1),
    terms           text,
    terms_url       text,
    purpose         text NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT now(),
    rotated_at      timestamptz NOT NULL DEFAULT now(),
    revoked_at      timestamptz,
    CHECK ((revoked_at IS NULL) = (key_hash IS NOT NULL))
);

-- SensorThings' spatial filters on Things and Locations (st_within, geo.distance) use it.
CREATE INDEX devices_location ON devices USING gist (point(longitude, latitude));

-- Every request: who asked for what, when, and what it got.
CREATE TABLE api_access (
    time        timestamptz NOT NULL,
    client_id   text,                 -- NULL: no valid key
    method      text NOT NULL,
    path        text NOT NULL,
    query       text NOT NULL,
    status      smallint NOT NULL,
    entities    integer NOT NULL,
    duration_ms real NOT NULL,
    remote      text NOT NULL
);
SELECT create_hypertable('api_access', by_range('time', INTERVAL '7 days'));
CREATE INDEX api_access_client_time ON api_access (client_id, time DESC);
-- What the bureau reads of it (`citytel query access`, Grafana): the reader role gets this view.
CREATE VIEW api_access_log AS
    SELECT time, client_id, method, path, query, status, entities, duration_ms, remote FROM api_access;

-- The access log is kept for storage.retention_days_access_log: the processor's maintenance
-- drops its old chunks through citytel_drop_chunks, which now lists it too.
CREATE OR REPLACE FUNCTION citytel_drop_chunks(hypertable text, older_than timestamptz) RETURNS SETOF text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    IF hypertable NOT IN ('readings', 'anomalies', 'rollup_1m', 'rollup_1h', 'api_access') THEN
        RAISE EXCEPTION 'citytel_drop_chunks: % is not one of citytel''s hypertables', hypertable;
    END IF;
    RETURN QUERY SELECT drop_chunks(hypertable::regclass, older_than => older_than)::text;
END
$$;
REVOKE ALL ON FUNCTION citytel_drop_chunks(text, timestamptz) FROM PUBLIC;
