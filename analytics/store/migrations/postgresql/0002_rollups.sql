-- Rollups at 1 minute, 1 hour and 1 day per (device, metric): count, sum, min, max.
-- Mean is sum / n; zone and city figures add up the rows of their devices, so every
-- aggregate stays exact however it is regrouped. The ingest service keeps them current:
-- each write records the time range it touched in rollup_dirty (same transaction), and
-- the refresher recomputes exactly those ranges (1 min from readings, 1 h from 1 min,
-- 1 day from 1 h). This mirrors what TimescaleDB's continuous aggregates do.

ALTER TABLE batches ADD COLUMN oldest_reading timestamptz;

CREATE TABLE rollup_dirty (
    device_id text NOT NULL,
    lo        timestamptz NOT NULL,
    hi        timestamptz NOT NULL
);

CREATE TABLE rollup_1m (
    device_id text NOT NULL,
    metric    smallint NOT NULL,
    bucket    timestamptz NOT NULL,
    n         bigint NOT NULL,
    sum       double precision NOT NULL,
    min       double precision NOT NULL,
    max       double precision NOT NULL,
    PRIMARY KEY (device_id, metric, bucket)
);
CREATE TABLE rollup_1h (LIKE rollup_1m INCLUDING ALL);
CREATE TABLE rollup_1d (LIKE rollup_1m INCLUDING ALL);
-- zone / city series: one metric over a time range across devices
CREATE INDEX rollup_1m_metric_bucket ON rollup_1m (metric, bucket);
CREATE INDEX rollup_1h_metric_bucket ON rollup_1h (metric, bucket);
CREATE INDEX rollup_1d_metric_bucket ON rollup_1d (metric, bucket);

-- device "last seen" without aggregating the whole ledger
CREATE INDEX batches_device_newest ON batches (device_id, newest_reading);
