-- demo_002 only took privileges away; its rollback keeps them taken away
-- (the demo's own rollback drops the functions).
SELECT 1 WHERE false;
