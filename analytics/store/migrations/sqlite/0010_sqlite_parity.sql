-- What the PostgreSQL and TimescaleDB trees have and this one lacked (the trees had
-- drifted; tests/test_store_schema.py now compares them): the CHECK on reports.kind
-- (their 0006) and the index for a device's "last seen" (their 0002).
-- SQLite cannot add a CHECK to a table: the (small) reports table is rebuilt with it,
-- rows and ids kept.
CREATE TABLE reports_checked (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    scope            TEXT NOT NULL,
    kind             TEXT NOT NULL CHECK (kind IN ('daily', 'weekly')),
    period_start     INTEGER NOT NULL,
    period_end       INTEGER NOT NULL,
    created_at       INTEGER NOT NULL,
    text             TEXT NOT NULL,
    narrative_source TEXT NOT NULL,
    fallback_reason  TEXT,
    model            TEXT,
    prompt_version   TEXT NOT NULL,
    fact_sheet       TEXT NOT NULL,
    ledger_digest    TEXT NOT NULL,
    ledger_batches   INTEGER NOT NULL,
    UNIQUE (scope, kind, period_start)
);
INSERT INTO reports_checked (id, scope, kind, period_start, period_end, created_at, text,
    narrative_source, fallback_reason, model, prompt_version, fact_sheet, ledger_digest,
    ledger_batches)
SELECT id, scope, kind, period_start, period_end, created_at, text, narrative_source,
    fallback_reason, model, prompt_version, fact_sheet, ledger_digest, ledger_batches
FROM reports;
DROP TABLE reports;
ALTER TABLE reports_checked RENAME TO reports;
CREATE INDEX reports_created ON reports (created_at);

CREATE INDEX batches_device_newest ON batches (device_id, newest_reading);
