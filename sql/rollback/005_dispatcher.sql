-- Rollback of 005_dispatcher: the entries, their helpers, the secret and
-- the catalog's dispatcher columns. The owner role is cluster-wide and is
-- kept; so are the runtime role's logging settings (they only hide values).
DROP FUNCTION IF EXISTS public.fn_dot_iu_status();
DROP FUNCTION IF EXISTS public.fn_dot_iu_ledger(jsonb, int);
DROP FUNCTION IF EXISTS public.fn_dot_iu_catalog_resolve(text);
DROP FUNCTION IF EXISTS public.fn_dot_iu_command_resolves(text[], text[], text[]);
DROP FUNCTION IF EXISTS public.fn_dot_iu_fail(text, text, jsonb, text, text, text, jsonb);
DROP FUNCTION IF EXISTS public.fn_dot_iu_refuse(text, text, jsonb, text, text, text, jsonb);
DROP FUNCTION IF EXISTS public.fn_dot_iu_dispatch(text, text, jsonb, text, text, text, boolean, bigint, jsonb);
DROP FUNCTION IF EXISTS public.fn_dot_iu_entry_command(text);
DROP FUNCTION IF EXISTS public.fn_dot_iu_check_call(text, text, text);
DROP FUNCTION IF EXISTS public.fn_dot_iu_record(text, text, text, text, text, text, jsonb, text, text[], text[]);
DROP FUNCTION IF EXISTS public.fn_dot_iu_evidence(text, jsonb, int, text, text[], timestamptz, jsonb);
DROP FUNCTION IF EXISTS public.fn_dot_iu_run_row(bigint, text, text, text[], text[], boolean, text);
DROP FUNCTION IF EXISTS public.fn_dot_iu_log_exposure();
DROP FUNCTION IF EXISTS public.fn_dot_iu_params_problem(jsonb, jsonb);
DROP FUNCTION IF EXISTS public.fn_dot_iu_params_digest(text, jsonb);
DROP TABLE IF EXISTS public.dot_iu_secret;
DO $$
BEGIN
    IF to_regclass('public.dot_iu_command_catalog') IS NOT NULL THEN
        ALTER TABLE public.dot_iu_command_catalog
            DROP COLUMN IF EXISTS statements, DROP COLUMN IF EXISTS statement_kinds,
            DROP COLUMN IF EXISTS param_specs, DROP COLUMN IF EXISTS expect_status,
            DROP COLUMN IF EXISTS unavailable;
    END IF;
END
$$;
DELETE FROM public.dot_schema_migrations WHERE version = '005_dispatcher';
