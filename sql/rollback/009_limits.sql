-- Rollback of 009_limits.
DROP INDEX IF EXISTS public.dot_iu_command_run_plan_idx;
DROP TABLE IF EXISTS public.dot_iu_freeze;
ALTER TABLE public.dot_iu_command_catalog DROP COLUMN IF EXISTS max_rows, DROP COLUMN IF EXISTS approvals_required;
DELETE FROM public.dot_schema_migrations WHERE version = '009_limits';
