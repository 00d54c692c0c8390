-- Zone shapes for the dashboard map (GeoJSON geometry per zone, editable by admins) and
-- the newest health report of each device's agent (unsigned: informational only).
CREATE TABLE zone_shapes (
    zone       TEXT PRIMARY KEY,
    label      TEXT NOT NULL,
    geometry   TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE device_health (
    device_id      TEXT PRIMARY KEY,
    reported_at    INTEGER NOT NULL,
    received_at    INTEGER NOT NULL,
    gateway_id     TEXT NOT NULL,
    outbox_batches INTEGER NOT NULL,
    outbox_readings INTEGER NOT NULL,
    model_version  TEXT NOT NULL,
    agent_version  TEXT NOT NULL
);
