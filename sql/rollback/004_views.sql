-- Rollback of 004_views.
DROP VIEW IF EXISTS public.v_dot_iu_command_run_health;
DROP VIEW IF EXISTS public.v_dot_iu_command_registry;
DELETE FROM public.dot_schema_migrations WHERE version = '004_views';
