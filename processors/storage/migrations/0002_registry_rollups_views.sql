-- citytel 0002: quality flags, device registry, alerts history, rollup bookkeeping, AQI
-- breakpoints and the views operators query.

-- Bit flags: 1 = late (received more than 5 minutes after its own time). 0 = nothing to say.
ALTER TABLE readings ADD COLUMN quality smallint NOT NULL DEFAULT 0;

-- District aggregates join readings to series by district and kind.
CREATE INDEX series_district_kind ON series (district, kind, metric);

CREATE TABLE devices (
    device_id   text PRIMARY KEY,
    kind        text NOT NULL,
    district    text NOT NULL,
    latitude    double precision CHECK (latitude BETWEEN -90 AND 90),
    longitude   double precision CHECK (longitude BETWEEN -180 AND 180),
    capacity    integer CHECK (capacity >= 0),      -- parking lots: bays
    installed   date,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Every alert transition (open, update, resolve), for the alerts issue.
CREATE TABLE alerts (
    time        timestamptz NOT NULL,
    alert_id    text        NOT NULL,
    rule        text        NOT NULL,
    state       text        NOT NULL CHECK (state IN ('open', 'update', 'resolve')),
    severity    text        NOT NULL,
    department  text        NOT NULL,
    district    text        NOT NULL,
    device_id   text,
    details     jsonb       NOT NULL DEFAULT '{}'
);
SELECT create_hypertable('alerts', by_range('time', INTERVAL '30 days'));
CREATE UNIQUE INDEX alerts_id_time_state ON alerts (alert_id, time DESC, state);

-- Minute buckets whose readings changed since the rollups last saw them (Apache edition:
-- citytel maintains the rollups itself). The sink upserts here in the same transaction as the
-- readings; the upsert locks the row, so a refresh that claims a bucket waits for writers of it.
CREATE TABLE rollup_dirty (
    bucket     timestamptz PRIMARY KEY,
    marked_at  timestamptz NOT NULL DEFAULT now()
);

-- China's HJ 633-2012 individual AQI (IAQI) breakpoints: concentration low..high maps linearly
-- to IAQI low..high. µg/m³, CO in mg/m³. 'hourly' rows apply to 1-hour means, 'daily' to
-- 24-hour means.
CREATE TABLE aqi_breakpoints (
    standard    text NOT NULL,
    pollutant   text NOT NULL,
    averaging   text NOT NULL,
    c_low       double precision NOT NULL,
    c_high      double precision NOT NULL,
    i_low       integer NOT NULL,
    i_high      integer NOT NULL,
    PRIMARY KEY (standard, pollutant, averaging, c_low)
);
INSERT INTO aqi_breakpoints (standard, pollutant, averaging, c_low, c_high, i_low, i_high)
SELECT 'HJ633', pollutant, averaging, c_low, c_high, i_low, i_high
FROM (VALUES
    ('so2', 'hourly', ARRAY[0, 150, 500, 650, 800]),
    ('so2', 'daily', ARRAY[0, 50, 150, 475, 800, 1600, 2100, 2620]),
    ('no2', 'hourly', ARRAY[0, 100, 200, 700, 1200, 2340, 3090, 3840]),
    ('no2', 'daily', ARRAY[0, 40, 80, 180, 280, 565, 750, 940]),
    ('co', 'hourly', ARRAY[0, 5, 10, 35, 60, 90, 120, 150]),
    ('co', 'daily', ARRAY[0, 2, 4, 14, 24, 36, 48, 60]),
    ('o3', 'hourly', ARRAY[0, 160, 200, 300, 400, 800, 1000, 1200]),
    ('pm10', 'daily', ARRAY[0, 50, 150, 250, 350, 420, 500, 600]),
    ('pm2_5', 'daily', ARRAY[0, 35, 75, 115, 150, 250, 350, 500])
) AS t(pollutant, averaging, limits),
LATERAL (
    SELECT limits[n]::double precision AS c_low, limits[n + 1]::double precision AS c_high,
           (ARRAY[0, 50, 100, 150, 200, 300, 400, 500])[n] AS i_low,
           (ARRAY[0, 50, 100, 150, 200, 300, 400, 500])[n + 1] AS i_high
    FROM generate_series(1, array_length(limits, 1) - 1) AS n
) AS ranges;

CREATE FUNCTION iaqi(standard text, pollutant text, averaging text, concentration double precision)
RETURNS double precision LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN concentration IS NULL THEN NULL
        WHEN concentration >= max(c_high) THEN 500
        ELSE max((i_high - i_low) / (c_high - c_low) * (concentration - c_low) + i_low)
             FILTER (WHERE concentration >= c_low AND concentration < c_high)
    END
    FROM aqi_breakpoints b
    WHERE b.standard = iaqi.standard AND b.pollutant = iaqi.pollutant AND b.averaging = iaqi.averaging
$$;

CREATE FUNCTION aqi_level(aqi double precision) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN aqi IS NULL THEN NULL
        WHEN aqi <= 50 THEN '优'
        WHEN aqi <= 100 THEN '良'
        WHEN aqi <= 150 THEN '轻度污染'
        WHEN aqi <= 200 THEN '中度污染'
        WHEN aqi <= 300 THEN '重度污染'
        ELSE '严重污染'
    END
$$;

-- Latest value and time of every series, with its device: what operators look at first.
CREATE VIEW device_status AS
    SELECT s.device_id, s.kind, s.district, s.metric, latest.time AS last_seen, latest.value
    FROM series s
    CROSS JOIN LATERAL (
        SELECT r.time, r.value FROM readings r WHERE r.series_id = s.series_id ORDER BY r.time DESC LIMIT 1
    ) AS latest;

-- District AQI now (HJ 633-2012), from the last hour: each pollutant's district mean over that
-- hour, then its IAQI (1-hour breakpoints for SO2, NO2, CO and O3; PM2.5 and PM10 have only
-- 24-hour breakpoints, applied to the last hour's mean as a nowcast). AQI is the highest IAQI;
-- the primary pollutant is the one that sets it, when the AQI is above 50.
CREATE VIEW district_aqi_now AS
    WITH means AS (
        SELECT s.district, s.metric AS pollutant, avg(r.value) AS concentration, count(*) AS readings
        FROM readings r JOIN series s USING (series_id)
        WHERE s.kind = 'air' AND s.metric IN ('pm2_5', 'pm10', 'so2', 'no2', 'co', 'o3')
          AND r.time > now() - INTERVAL '1 hour'
        GROUP BY s.district, s.metric
    ), scored AS (
        SELECT district, pollutant, concentration, readings,
               iaqi('HJ633', pollutant, CASE WHEN pollutant IN ('pm2_5', 'pm10') THEN 'daily' ELSE 'hourly' END,
                    concentration) AS iaqi
        FROM means
    )
    SELECT DISTINCT ON (district) district, round(iaqi)::integer AS aqi, aqi_level(iaqi) AS level,
           CASE WHEN iaqi > 50 THEN pollutant END AS primary_pollutant, concentration, readings
    FROM scored
    ORDER BY district, iaqi DESC NULLS LAST;

-- Free bays per parking lot now: its latest free-bay count and capacity (from the registry when
-- the lot is registered there, else from its own latest capacity reading).
CREATE VIEW parking_free_now AS
    SELECT st.device_id, st.district, st.last_seen, st.value AS free_bays,
           coalesce(d.capacity::double precision, cap.value) AS capacity
    FROM device_status st
    LEFT JOIN devices d USING (device_id)
    LEFT JOIN device_status cap ON cap.device_id = st.device_id AND cap.metric = 'capacity'
    WHERE st.kind = 'parking' AND st.metric = 'free_bays';

-- Traffic flow per counter over the last hour.
CREATE VIEW traffic_last_hour AS
    SELECT s.device_id, s.district,
           sum(r.value) FILTER (WHERE s.metric = 'vehicle_count') AS vehicles,
           avg(r.value) FILTER (WHERE s.metric = 'mean_speed') AS mean_speed_kmh,
           avg(r.value) FILTER (WHERE s.metric = 'occupancy') AS occupancy_percent,
           max(r.time) AS last_seen
    FROM readings r JOIN series s USING (series_id)
    WHERE s.kind = 'traffic' AND r.time > now() - INTERVAL '1 hour'
    GROUP BY s.device_id, s.district;

CREATE OR REPLACE VIEW readings_named AS
    SELECT r.time, s.device_id, s.kind, s.district, s.metric, r.value, r.quality
    FROM readings r JOIN series s USING (series_id);
