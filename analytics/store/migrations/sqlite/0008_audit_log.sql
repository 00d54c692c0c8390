-- The public audit log (issue 21): every accepted batch is a leaf, in ledger order,
-- written in the batch's own transaction. audit_leaves holds level 0 (the leaf hashes),
-- audit_nodes the hashes of the complete subtrees above it (see civicmesh/audit/merkle.py).
CREATE TABLE audit_head (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    size INTEGER NOT NULL CHECK (size >= 0)
);
INSERT INTO audit_head (id, size) VALUES (1, 0);
CREATE TABLE audit_leaves (
    idx       INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    seq       INTEGER NOT NULL,
    hash      BLOB NOT NULL CHECK (length(hash) = 32),
    UNIQUE (device_id, seq)
);
CREATE TABLE audit_nodes (
    level INTEGER NOT NULL CHECK (level >= 1),
    idx   INTEGER NOT NULL,
    hash  BLOB NOT NULL CHECK (length(hash) = 32),
    PRIMARY KEY (level, idx)
) WITHOUT ROWID;
-- Signed checkpoints and the witnesses' cosignatures of them.
CREATE TABLE audit_checkpoints (
    size    INTEGER PRIMARY KEY,
    note    BLOB NOT NULL,
    made_at_ms INTEGER NOT NULL
);
CREATE TABLE audit_cosignatures (
    size        INTEGER NOT NULL,
    witness     TEXT NOT NULL,
    line        TEXT NOT NULL,
    received_at_ms INTEGER NOT NULL,
    PRIMARY KEY (size, witness)
);
