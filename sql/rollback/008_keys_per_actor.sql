-- Rollback of 008_keys_per_actor.
DROP INDEX IF EXISTS public.dot_iu_command_run_actor_idx;
DELETE FROM public.dot_schema_migrations WHERE version = '008_keys_per_actor';
