-- Numbered like SQLite's 0010, which adds what this tree already has (the CHECK on
-- reports.kind, the index batches_device_newest): nothing to do here.
SELECT 1;
