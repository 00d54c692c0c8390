-- Rollups at 1 minute, 1 hour and 1 day per (device, metric): count, sum, min, max,
-- kept current from rollup_dirty exactly as on PostgreSQL (see its 0002_rollups.sql).
-- Buckets are epoch ms aligned to the bucket width from the epoch.

ALTER TABLE batches ADD COLUMN oldest_reading INTEGER;

CREATE TABLE rollup_dirty (
    device_id TEXT NOT NULL,
    lo        INTEGER NOT NULL,
    hi        INTEGER NOT NULL
);

CREATE TABLE rollup_1m (
    device_id TEXT NOT NULL,
    metric    INTEGER NOT NULL,
    bucket    INTEGER NOT NULL,
    n         INTEGER NOT NULL,
    sum       REAL NOT NULL,
    min       REAL NOT NULL,
    max       REAL NOT NULL,
    PRIMARY KEY (device_id, metric, bucket)
);
CREATE TABLE rollup_1h (
    device_id TEXT NOT NULL,
    metric    INTEGER NOT NULL,
    bucket    INTEGER NOT NULL,
    n         INTEGER NOT NULL,
    sum       REAL NOT NULL,
    min       REAL NOT NULL,
    max       REAL NOT NULL,
    PRIMARY KEY (device_id, metric, bucket)
);
CREATE TABLE rollup_1d (
    device_id TEXT NOT NULL,
    metric    INTEGER NOT NULL,
    bucket    INTEGER NOT NULL,
    n         INTEGER NOT NULL,
    sum       REAL NOT NULL,
    min       REAL NOT NULL,
    max       REAL NOT NULL,
    PRIMARY KEY (device_id, metric, bucket)
);
CREATE INDEX rollup_1m_metric_bucket ON rollup_1m (metric, bucket);
CREATE INDEX rollup_1h_metric_bucket ON rollup_1h (metric, bucket);
CREATE INDEX rollup_1d_metric_bucket ON rollup_1d (metric, bucket);
