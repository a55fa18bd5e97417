-- Rollback of 007_refuse_settles_first: the function stays in its 007
-- form until 005's rollback drops it (an older refuse entry would report
-- a committed apply as refused).
DELETE FROM public.dot_schema_migrations WHERE version = '007_refuse_settles_first';
