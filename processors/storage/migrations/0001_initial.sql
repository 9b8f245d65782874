-- citytel 0001: series registry, readings and anomalies hypertables.
CREATE EXTENSION IF NOT EXISTS timescaledb;

-- One row per (device, metric). Readings refer to it by a 4-byte id, which keeps the hot
-- hypertable narrow (time, id, value) and lets the processor build COPY rows with numpy.
CREATE TABLE series (
    series_id   integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id   text NOT NULL,
    kind        text NOT NULL,
    district    text NOT NULL,
    metric      text NOT NULL,
    first_seen  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (device_id, metric)
);

CREATE TABLE readings (
    time       timestamptz      NOT NULL,
    series_id  integer          NOT NULL,
    value      double precision NOT NULL
);
-- A day per chunk: a city's few million readings a day fit a chunk whose indexes stay in memory.
SELECT create_hypertable('readings', by_range('time', INTERVAL '1 day'));
-- The natural key: a redelivered reading is the same row, so writes are idempotent.
CREATE UNIQUE INDEX readings_series_time ON readings (series_id, time DESC);

CREATE TABLE anomalies (
    time        timestamptz      NOT NULL,
    series_id   integer          NOT NULL,
    detector    text             NOT NULL,
    score       real             NOT NULL,
    reason      text             NOT NULL,
    value       double precision NOT NULL,
    detected_at timestamptz      NOT NULL DEFAULT now()
);
SELECT create_hypertable('anomalies', by_range('time', INTERVAL '7 days'));
CREATE UNIQUE INDEX anomalies_series_time_detector ON anomalies (series_id, time DESC, detector);

-- What operators read: names instead of ids.
CREATE VIEW readings_named AS
    SELECT r.time, s.device_id, s.kind, s.district, s.metric, r.value
    FROM readings r JOIN series s USING (series_id);

CREATE VIEW anomalies_named AS
    SELECT a.time, s.device_id, s.kind, s.district, s.metric, a.detector, a.score, a.reason, a.value,
           a.detected_at
    FROM anomalies a JOIN series s USING (series_id);
