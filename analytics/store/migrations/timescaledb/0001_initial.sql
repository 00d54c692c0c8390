-- civicmesh central store on TimescaleDB 2.x, schema 1: the plain PostgreSQL schema with
-- readings and the batch ledger as hypertables. Times are timestamptz (UTC on the wire).
-- Ids are ASCII and compared bytewise (COLLATE "C"), as on the plain path (its 0004).
-- The store creates the extension once per database (in public, unless it is there
-- already) before this runs, and writes its schema for @timescaledb@: every call is
-- qualified, so stores in other schemas of the same database find the functions.

CREATE TABLE devices (
    device_id     text COLLATE "C" PRIMARY KEY,
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
    device_id       text COLLATE "C" NOT NULL,
    seq             bigint NOT NULL CHECK (seq >= 1),
    payload_hash    bytea NOT NULL CHECK (length(payload_hash) = 32),
    prev_hash       bytea NOT NULL CHECK (length(prev_hash) = 32),
    sealed_at       timestamptz NOT NULL,
    model_version   text NOT NULL,
    gateway_id      text COLLATE "C" NOT NULL,
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
-- The ledger is a hypertable on seq (integer partitioning): its key (device_id, seq) is
-- what makes ingest idempotent, and a unique index of a hypertable must contain the
-- partitioning column. 10 million seqs per chunk: years of batches per device.
SELECT @timescaledb@.create_hypertable('batches', 'seq', chunk_time_interval => 10000000);

-- Raw readings, partitioned by time (weekly, Monday 00:00 UTC). The store creates the
-- partitions a write needs before writing; the DEFAULT partition catches anything else.
-- No foreign key to the ledger: both are written in one transaction, and a per-row
-- check would cost more than the COPY itself. The CHECKs refuse NaN and infinities
-- (NaN sorts above 'Infinity' in PostgreSQL).
-- Raw readings as a hypertable on "ts". The chunk interval is set at start-up from
-- storage.timescale_chunk_hours (set_chunk_time_interval); one day is the default.
CREATE TABLE readings (
    device_id text COLLATE "C" NOT NULL,
    ts        timestamptz NOT NULL,
    metric    smallint NOT NULL CHECK (metric > 0),
    value     double precision NOT NULL CHECK (value > '-Infinity' AND value < 'Infinity'),
    quality   integer NOT NULL CHECK (quality BETWEEN 0 AND 65535),
    raw       double precision CHECK (raw > '-Infinity' AND raw < 'Infinity'),
    anomaly   double precision CHECK (anomaly > '-Infinity' AND anomaly < 'Infinity'),
    seq       bigint NOT NULL
);
SELECT @timescaledb@.create_hypertable('readings', 'ts', chunk_time_interval => INTERVAL '1 day');
CREATE INDEX readings_device_metric_ts ON readings (device_id, metric, ts);
CREATE INDEX readings_metric_ts ON readings (metric, ts);
-- Compression segments by device and metric (the policy is added at start-up with
-- storage.timescale_compress_after_days).
ALTER TABLE readings SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'device_id, metric',
    timescaledb.compress_orderby = 'ts'
);

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
    device_id      text COLLATE "C",
    seq            bigint
);
CREATE INDEX quarantine_received ON quarantine (received_at);
