-- The public audit log (issue 21): every accepted batch is a leaf, in ledger order,
-- written in the batch's own transaction. audit_leaves holds level 0 (the leaf hashes),
-- audit_nodes the hashes of the complete subtrees above it (see civicmesh/audit/merkle.py).
-- Writers serialize on the audit_head row (SELECT ... FOR UPDATE).
CREATE TABLE audit_head (
    id   integer PRIMARY KEY CHECK (id = 1),
    size bigint NOT NULL CHECK (size >= 0)
);
INSERT INTO audit_head (id, size) VALUES (1, 0);
CREATE TABLE audit_leaves (
    idx       bigint PRIMARY KEY,
    device_id text NOT NULL,
    seq       bigint NOT NULL,
    hash      bytea NOT NULL CHECK (length(hash) = 32),
    UNIQUE (device_id, seq)
);
CREATE TABLE audit_nodes (
    level smallint NOT NULL CHECK (level >= 1),
    idx   bigint NOT NULL,
    hash  bytea NOT NULL CHECK (length(hash) = 32),
    PRIMARY KEY (level, idx)
);
-- Signed checkpoints and the witnesses' cosignatures of them.
CREATE TABLE audit_checkpoints (
    size    bigint PRIMARY KEY,
    note    bytea NOT NULL,
    made_at_ms bigint NOT NULL
);
CREATE TABLE audit_cosignatures (
    size        bigint NOT NULL,
    witness     text NOT NULL,
    line        text NOT NULL,
    received_at_ms bigint NOT NULL,
    PRIMARY KEY (size, witness)
);
