-- Daily and weekly reports, each kept with the fact sheet it states, the model and
-- prompt version that wrote it, and the ledger span (chain heads) it rests on.
CREATE TABLE reports (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    scope            TEXT NOT NULL,
    kind             TEXT NOT NULL,
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
CREATE INDEX reports_created ON reports (created_at);
