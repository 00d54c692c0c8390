-- Zone shapes for the dashboard map (GeoJSON geometry per zone, editable by admins) and
-- the newest health report of each device's agent (unsigned: informational only).
CREATE TABLE zone_shapes (
    zone       text COLLATE "C" PRIMARY KEY,
    label      text NOT NULL,
    geometry   text NOT NULL,
    updated_at timestamptz NOT NULL
);
CREATE TABLE device_health (
    device_id       text COLLATE "C" PRIMARY KEY,
    reported_at     timestamptz NOT NULL,
    received_at     timestamptz NOT NULL,
    gateway_id      text NOT NULL,
    outbox_batches  integer NOT NULL,
    outbox_readings integer NOT NULL,
    model_version   text NOT NULL,
    agent_version   text NOT NULL
);
