-- What retention has dropped: per relation (readings or a rollup level), the time before
-- which its data is gone. refresh_rollups() rebuilds a bucket only from a source that is
-- complete for it, so late data past a retention never turns a correct hour or day
-- bucket into a partial one.
CREATE TABLE retention_horizons (
    relation text COLLATE "C" PRIMARY KEY,
    horizon  timestamptz NOT NULL
);
