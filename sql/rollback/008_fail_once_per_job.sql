-- Rollback of 008_fail_once_per_job: the function stays in its 008 form
-- until 005's rollback drops it (an older fail entry would write a
-- timed-out job's owed row twice).
DELETE FROM public.dot_schema_migrations WHERE version = '008_fail_once_per_job';
