-- Zone rollups at 1 hour and 1 day, plain tables as on the plain path (its 0005): the
-- continuous aggregates summed over each zone's devices, recomputed by refresh_rollups()
-- for the windows it refreshed. (A continuous aggregate joined to devices would not
-- follow a device that moves to another zone.)
CREATE TABLE rollup_zone_1h (
    zone   text COLLATE "C" NOT NULL,
    metric smallint NOT NULL,
    bucket timestamptz NOT NULL,
    n      bigint NOT NULL,
    sum    double precision NOT NULL,
    min    double precision NOT NULL,
    max    double precision NOT NULL,
    PRIMARY KEY (zone, metric, bucket)
);
CREATE TABLE rollup_zone_1d (LIKE rollup_zone_1h INCLUDING ALL);
CREATE INDEX rollup_zone_1h_bucket ON rollup_zone_1h (bucket);
CREATE INDEX rollup_zone_1d_bucket ON rollup_zone_1d (bucket);
