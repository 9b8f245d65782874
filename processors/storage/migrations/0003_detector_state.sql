-- citytel 0003: detector state checkpoints, one row per consumer group and partition.
-- next_offset is the first Kafka offset the saved state has not seen: a processor that takes
-- the partition over restores the state and resumes reading there.
CREATE TABLE detector_state (
    consumer_group text        NOT NULL,
    topic          text        NOT NULL,
    partition      integer     NOT NULL,
    next_offset    bigint      NOT NULL,
    series         integer     NOT NULL,
    state          bytea       NOT NULL,
    saved_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition)
);
