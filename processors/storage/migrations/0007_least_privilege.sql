-- citytel 0007: the processor drops old chunks through this function, so that its role needs no
-- ownership of the tables (processors/storage/grants.py): whole chunks of citytel's own
-- hypertables, nothing else. It runs with its owner's rights; only granted roles may call it.
CREATE FUNCTION citytel_drop_chunks(hypertable text, older_than timestamptz) RETURNS SETOF text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    IF hypertable NOT IN ('readings', 'anomalies', 'rollup_1m', 'rollup_1h') THEN
        RAISE EXCEPTION 'citytel_drop_chunks: % is not one of citytel''s hypertables', hypertable;
    END IF;
    RETURN QUERY SELECT drop_chunks(hypertable::regclass, older_than => older_than)::text;
END
$$;
REVOKE ALL ON FUNCTION citytel_drop_chunks(text, timestamptz) FROM PUBLIC;
