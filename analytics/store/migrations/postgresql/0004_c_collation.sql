-- Device and gateway ids are ASCII (base32): compare them bytewise. With the database's
-- default collation (en_US.UTF-8, C.UTF-8) every index insert and every sort on an id
-- goes through strcoll and PostgreSQL 15 cannot use abbreviated keys; "C" is memcmp.
ALTER TABLE devices ALTER COLUMN device_id TYPE text COLLATE "C";
ALTER TABLE batches ALTER COLUMN device_id TYPE text COLLATE "C";
ALTER TABLE batches ALTER COLUMN gateway_id TYPE text COLLATE "C";
ALTER TABLE readings ALTER COLUMN device_id TYPE text COLLATE "C";
ALTER TABLE rollup_dirty ALTER COLUMN device_id TYPE text COLLATE "C";
ALTER TABLE rollup_1m ALTER COLUMN device_id TYPE text COLLATE "C";
ALTER TABLE rollup_1h ALTER COLUMN device_id TYPE text COLLATE "C";
ALTER TABLE rollup_1d ALTER COLUMN device_id TYPE text COLLATE "C";
ALTER TABLE quarantine ALTER COLUMN device_id TYPE text COLLATE "C";
