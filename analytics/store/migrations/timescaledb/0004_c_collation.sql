-- Numbered like the plain path's 0004, which this schema had from its first migration:
-- ids are already COLLATE "C" here.
SELECT 1;
