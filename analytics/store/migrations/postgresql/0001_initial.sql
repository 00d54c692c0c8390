-- civicmesh central store on PostgreSQL, schema 1. Times are timestamptz (UTC on the wire).
-- Kept TimescaleDB-ready: readings has no unique index, and its time column is "ts".

CREATE TABLE devices (
    device_id     text PRIMARY KEY,
    zone          text NOT NULL,
    lat           double precision,
    lon           double precision,
    kind          text NOT NULL,
    status        text NOT NULL,
    registered_at timestamptz NOT NULL
);
CREATE INDEX devices_zone ON devices (zone);

-- The batch ledger: one row per accepted device batch, the proof of what was ingested.
CREATE TABLE batches (
    device_id       text NOT NULL,
    seq             bigint NOT NULL CHECK (seq >= 1),
    payload_hash    bytea NOT NULL CHECK (length(payload_hash) = 32),
    prev_hash       bytea NOT NULL CHECK (length(prev_hash) = 32),
    sealed_at       timestamptz NOT NULL,
    model_version   text NOT NULL,
    gateway_id      text NOT NULL,
    received_at     timestamptz NOT NULL,
    ingested_at     timestamptz NOT NULL,
    n_readings      integer NOT NULL CHECK (n_readings >= 0),
    -- newest reading time of the batch (NULL when empty): device "last seen" without
    -- scanning readings
    newest_reading  timestamptz,
    device_message  bytea NOT NULL,
    gateway_message bytea NOT NULL,
    PRIMARY KEY (device_id, seq)
);

-- Raw readings, partitioned by time (weekly, Monday 00:00 UTC). The store creates the
-- partitions a write needs before writing; the DEFAULT partition catches anything else.
-- No foreign key to the ledger: both are written in one transaction, and a per-row
-- check would cost more than the COPY itself. The CHECKs refuse NaN and infinities
-- (NaN sorts above 'Infinity' in PostgreSQL).
CREATE TABLE readings (
    device_id text NOT NULL,
    ts        timestamptz NOT NULL,
    metric    smallint NOT NULL CHECK (metric > 0),
    value     double precision NOT NULL CHECK (value > '-Infinity' AND value < 'Infinity'),
    quality   integer NOT NULL CHECK (quality BETWEEN 0 AND 65535),
    raw       double precision CHECK (raw > '-Infinity' AND raw < 'Infinity'),
    anomaly   double precision CHECK (anomaly > '-Infinity' AND anomaly < 'Infinity'),
    seq       bigint NOT NULL
) PARTITION BY RANGE (ts);
CREATE TABLE readings_default PARTITION OF readings DEFAULT;
-- one device (optionally one metric) over time; newest per (device, metric)
CREATE INDEX readings_device_metric_ts ON readings (device_id, metric, ts);
-- one metric across the city over time
CREATE INDEX readings_metric_ts ON readings (metric, ts);

CREATE TABLE quarantine (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    reason         text NOT NULL,
    detail         text NOT NULL,
    source         text NOT NULL,
    topic          text NOT NULL,
    received_at    timestamptz NOT NULL,
    payload_size   integer NOT NULL,
    payload_sha256 text NOT NULL,
    payload        bytea NOT NULL,
    device_id      text,
    seq            bigint
);
CREATE INDEX quarantine_received ON quarantine (received_at);
