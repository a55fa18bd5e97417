-- demo_002 only took privileges away; its rollback keeps them taken away
-- (the demo's own rollback drops the functions).
DELETE FROM public.dot_schema_migrations WHERE version = 'demo_002_least_privilege';
