-- Rollback of 008_keys_per_actor (the whole rollback runs in one
-- transaction, down to 005's, which drops the entries that call the
-- helper): the entries stay in their 008 form until then.
DROP FUNCTION IF EXISTS public.fn_dot_iu_key_prior(text, text, text, text);
DELETE FROM public.dot_schema_migrations WHERE version = '008_keys_per_actor';
DROP INDEX IF EXISTS public.dot_iu_command_run_actor_idx;
