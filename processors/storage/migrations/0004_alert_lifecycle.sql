-- citytel 0004: alert lifecycle. A transition goes to several departments, so the history row
-- carries them all; each transition has its sequence number within its alert and stays
-- unpublished (published_at NULL) until it has gone out on Kafka and MQTT (an outbox).
ALTER TABLE alerts DROP COLUMN department;
ALTER TABLE alerts ADD COLUMN sequence integer NOT NULL DEFAULT 1;
ALTER TABLE alerts ADD COLUMN departments text[] NOT NULL DEFAULT '{}';
ALTER TABLE alerts ADD COLUMN published_at timestamptz;
DROP INDEX alerts_id_time_state;
CREATE UNIQUE INDEX alerts_id_sequence ON alerts (alert_id, sequence, time);
CREATE INDEX alerts_unpublished ON alerts (time) WHERE published_at IS NULL;

-- The current alert of every (rule, scope) ever alerted: open ones, and resolved ones (kept for
-- the cooldown and so a new alert of the same scope gets a new id). Survives restarts.
CREATE TABLE alert_state (
    rule         text        NOT NULL,
    scope_key    text        NOT NULL,   -- a district, or a device id
    alert_id     text        NOT NULL,
    state        text        NOT NULL CHECK (state IN ('open', 'resolved')),
    severity     text        NOT NULL,
    district     text        NOT NULL,
    device_id    text,
    opened_at    timestamptz NOT NULL,
    changed_at   timestamptz NOT NULL,   -- event time of the last transition
    sequence     integer     NOT NULL,
    departments  text[]      NOT NULL,   -- everyone told so far hears every later transition
    PRIMARY KEY (rule, scope_key)
);

-- How far (in event time) the alerter has evaluated its rules: a restart resumes here.
CREATE TABLE alerter_progress (
    name             text PRIMARY KEY,
    evaluated_until  timestamptz NOT NULL
);
