-- Numbered like PostgreSQL's 0004 (ids compared bytewise): SQLite's default BINARY
-- collation does that already, so the schema versions stay aligned with nothing to do.
SELECT 1;
