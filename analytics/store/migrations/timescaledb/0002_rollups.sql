-- civicmesh: no-transaction
-- Continuous aggregates at 1 minute, 1 hour (on the 1-minute one) and 1 day (on the
-- hourly one: hierarchical, TimescaleDB >= 2.9), with the same columns as the plain
-- path's rollup tables, so the same queries read both. Real-time aggregation
-- (materialized_only = false) adds what the last refresh has not materialized yet.
-- CREATE MATERIALIZED VIEW ... WITH (timescaledb.continuous) cannot run inside a
-- transaction block: the marker above makes the store run this file statement by
-- statement. Every statement is idempotent, so an interrupted run can be repeated.

ALTER TABLE batches ADD COLUMN IF NOT EXISTS oldest_reading timestamptz;

CREATE INDEX IF NOT EXISTS batches_device_newest ON batches (device_id, newest_reading);

-- Time ranges written since the last refresh, as on the plain path: refresh_rollups()
-- refreshes exactly these windows, so late data is rolled up too (the policies below
-- only look back over their start_offset).
CREATE TABLE IF NOT EXISTS rollup_dirty (
    device_id text COLLATE "C" NOT NULL,
    lo        timestamptz NOT NULL,
    hi        timestamptz NOT NULL
);

CREATE MATERIALIZED VIEW IF NOT EXISTS rollup_1m
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT device_id, metric, @timescaledb@.time_bucket(INTERVAL '1 minute', ts) AS bucket,
       count(*) AS n, sum(value) AS sum, min(value) AS min, max(value) AS max
FROM readings
GROUP BY device_id, metric, @timescaledb@.time_bucket(INTERVAL '1 minute', ts)
WITH NO DATA;

CREATE MATERIALIZED VIEW IF NOT EXISTS rollup_1h
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT device_id, metric, @timescaledb@.time_bucket(INTERVAL '1 hour', bucket) AS bucket,
       sum(n)::bigint AS n, sum(sum) AS sum, min(min) AS min, max(max) AS max
FROM rollup_1m
GROUP BY device_id, metric, @timescaledb@.time_bucket(INTERVAL '1 hour', bucket)
WITH NO DATA;

CREATE MATERIALIZED VIEW IF NOT EXISTS rollup_1d
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT device_id, metric, @timescaledb@.time_bucket(INTERVAL '1 day', bucket) AS bucket,
       sum(n)::bigint AS n, sum(sum) AS sum, min(min) AS min, max(max) AS max
FROM rollup_1h
GROUP BY device_id, metric, @timescaledb@.time_bucket(INTERVAL '1 day', bucket)
WITH NO DATA;

CREATE INDEX IF NOT EXISTS rollup_1m_metric_bucket ON rollup_1m (metric, bucket);
CREATE INDEX IF NOT EXISTS rollup_1h_metric_bucket ON rollup_1h (metric, bucket);
CREATE INDEX IF NOT EXISTS rollup_1d_metric_bucket ON rollup_1d (metric, bucket);

-- Refresh policies: each level a little behind the one below it.
SELECT @timescaledb@.add_continuous_aggregate_policy('rollup_1m', start_offset => INTERVAL '3 hours',
    end_offset => INTERVAL '1 minute', schedule_interval => INTERVAL '1 minute',
    if_not_exists => true);
SELECT @timescaledb@.add_continuous_aggregate_policy('rollup_1h', start_offset => INTERVAL '3 days',
    end_offset => INTERVAL '1 hour', schedule_interval => INTERVAL '15 minutes',
    if_not_exists => true);
SELECT @timescaledb@.add_continuous_aggregate_policy('rollup_1d', start_offset => INTERVAL '35 days',
    end_offset => INTERVAL '1 day', schedule_interval => INTERVAL '1 hour',
    if_not_exists => true);
