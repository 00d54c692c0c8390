-- civicmesh embedded store, schema 1. Times are integer epoch milliseconds (UTC).

CREATE TABLE devices (
    device_id     TEXT PRIMARY KEY,
    zone          TEXT NOT NULL,
    lat           REAL,
    lon           REAL,
    kind          TEXT NOT NULL,
    status        TEXT NOT NULL,
    registered_at INTEGER NOT NULL
);
CREATE INDEX devices_zone ON devices (zone);

-- The batch ledger: one row per accepted device batch, the proof of what was ingested.
CREATE TABLE batches (
    device_id       TEXT NOT NULL,
    seq             INTEGER NOT NULL CHECK (seq >= 1),
    payload_hash    BLOB NOT NULL CHECK (length(payload_hash) = 32),
    prev_hash       BLOB NOT NULL CHECK (length(prev_hash) = 32),
    sealed_at       INTEGER NOT NULL,
    model_version   TEXT NOT NULL,
    gateway_id      TEXT NOT NULL,
    received_at     INTEGER NOT NULL,
    ingested_at     INTEGER NOT NULL,
    n_readings      INTEGER NOT NULL CHECK (n_readings >= 0),
    -- newest reading time of the batch (NULL when empty): device "last seen" without
    -- scanning readings
    newest_reading  INTEGER,
    device_message  BLOB NOT NULL,
    gateway_message BLOB NOT NULL,
    PRIMARY KEY (device_id, seq)
);

-- Raw readings. No foreign key to the ledger: both are written in one transaction, and
-- a per-row lookup would cost more than the whole insert. SQLite stores NaN as NULL, so
-- NOT NULL plus the range check refuse NaN and infinities.
CREATE TABLE readings (
    device_id TEXT NOT NULL,
    ts        INTEGER NOT NULL,
    metric    INTEGER NOT NULL CHECK (metric BETWEEN 1 AND 32767),
    value     REAL NOT NULL CHECK (value BETWEEN -1.7976931348623157e308 AND 1.7976931348623157e308),
    quality   INTEGER NOT NULL CHECK (quality BETWEEN 0 AND 65535),
    raw       REAL CHECK (raw BETWEEN -1.7976931348623157e308 AND 1.7976931348623157e308),
    anomaly   REAL CHECK (anomaly BETWEEN -1.7976931348623157e308 AND 1.7976931348623157e308),
    seq       INTEGER NOT NULL
);
-- one device (optionally one metric) over time; newest per (device, metric)
CREATE INDEX readings_device_metric_ts ON readings (device_id, metric, ts);
-- one metric across the city over time
CREATE INDEX readings_metric_ts ON readings (metric, ts);

CREATE TABLE quarantine (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    reason         TEXT NOT NULL,
    detail         TEXT NOT NULL,
    source         TEXT NOT NULL,
    topic          TEXT NOT NULL,
    received_at    INTEGER NOT NULL,
    payload_size   INTEGER NOT NULL,
    payload_sha256 TEXT NOT NULL,
    payload        BLOB NOT NULL,
    device_id      TEXT,
    seq            INTEGER
);
CREATE INDEX quarantine_received ON quarantine (received_at);
