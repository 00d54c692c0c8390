-- Zone rollups at 1 hour and 1 day, as on PostgreSQL (see its 0005_zone_rollups.sql).
CREATE TABLE rollup_zone_1h (
    zone   TEXT NOT NULL,
    metric INTEGER NOT NULL,
    bucket INTEGER NOT NULL,
    n      INTEGER NOT NULL,
    sum    REAL NOT NULL,
    min    REAL NOT NULL,
    max    REAL NOT NULL,
    PRIMARY KEY (zone, metric, bucket)
);
CREATE TABLE rollup_zone_1d (
    zone   TEXT NOT NULL,
    metric INTEGER NOT NULL,
    bucket INTEGER NOT NULL,
    n      INTEGER NOT NULL,
    sum    REAL NOT NULL,
    min    REAL NOT NULL,
    max    REAL NOT NULL,
    PRIMARY KEY (zone, metric, bucket)
);
CREATE INDEX rollup_zone_1h_bucket ON rollup_zone_1h (bucket);
CREATE INDEX rollup_zone_1d_bucket ON rollup_zone_1d (bucket);
