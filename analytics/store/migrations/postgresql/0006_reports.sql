-- Daily and weekly reports, each kept with the fact sheet it states, the model and
-- prompt version that wrote it, and the ledger span (chain heads) it rests on.
CREATE TABLE reports (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    scope            text COLLATE "C" NOT NULL,
    kind             text NOT NULL CHECK (kind IN ('daily', 'weekly')),
    period_start     timestamptz NOT NULL,
    period_end       timestamptz NOT NULL,
    created_at       timestamptz NOT NULL,
    text             text NOT NULL,
    narrative_source text NOT NULL,
    fallback_reason  text,
    model            text,
    prompt_version   text NOT NULL,
    fact_sheet       jsonb NOT NULL,
    ledger_digest    text NOT NULL,
    ledger_batches   integer NOT NULL,
    UNIQUE (scope, kind, period_start)
);
CREATE INDEX reports_created ON reports (created_at);
