-- Zone rollups at 1 hour and 1 day: the device rollups summed over each zone's devices,
-- recomputed by the same refresh for the zones and hours it touched. A zone's 30-day
-- hourly series is then 720 rows instead of 720 x its devices, and the city overview
-- reads a few hundred rows. Zones are those of the devices at refresh time.
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
