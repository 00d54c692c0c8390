-- As on PostgreSQL: zone and city series come from the rollups, so raw readings keep
-- the one (device_id, metric, ts) index.
DROP INDEX IF EXISTS readings_metric_ts;
