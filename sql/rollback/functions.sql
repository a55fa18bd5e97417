-- Rollback of the repeatable functions (sql/functions/), run first: every
-- function they define, and their bookkeeping. The versioned rollbacks
-- that follow drop the same functions again where they created them
-- (IF EXISTS), and the tables.
DROP FUNCTION IF EXISTS public.fn_dot_iu_ledger(jsonb);
DROP FUNCTION IF EXISTS public.fn_dot_iu_pin(jsonb);
DROP FUNCTION IF EXISTS public.fn_dot_iu_fail(jsonb);
DROP FUNCTION IF EXISTS public.fn_dot_iu_refuse(jsonb);
DROP FUNCTION IF EXISTS public.fn_dot_iu_dispatch(jsonb);
DROP FUNCTION IF EXISTS public.fn_dot_iu_call_fields(jsonb, text[]);
DROP FUNCTION IF EXISTS public.fn_dot_iu_ledger(jsonb, int);
DROP FUNCTION IF EXISTS public.fn_dot_iu_status();
DROP FUNCTION IF EXISTS public.fn_dot_iu_preflight();
DROP FUNCTION IF EXISTS public.fn_dot_iu_log_exposure();
DROP FUNCTION IF EXISTS public.fn_dot_iu_catalog_resolve(text);
DROP FUNCTION IF EXISTS public.fn_dot_iu_command_resolves(text[], text[], text[]);
DROP FUNCTION IF EXISTS public.fn_dot_iu_fail(text, text, jsonb, text, text, text, jsonb);
DROP FUNCTION IF EXISTS public.fn_dot_iu_refuse(text, text, jsonb, text, text, text, jsonb);
DROP FUNCTION IF EXISTS public.fn_dot_iu_dispatch(text, text, jsonb, text, text, text, boolean, bigint, jsonb);
DROP FUNCTION IF EXISTS public.fn_dot_iu_entry_command(text);
DROP FUNCTION IF EXISTS public.fn_dot_iu_rows_touched();
DROP FUNCTION IF EXISTS public.fn_dot_iu_rows_changed(jsonb, jsonb);
DROP FUNCTION IF EXISTS public.fn_dot_iu_freezes(text, text, timestamptz);
DROP FUNCTION IF EXISTS public.fn_dot_iu_plan_facts(public.dot_iu_command_catalog, text, text, text);
DROP FUNCTION IF EXISTS public.fn_dot_iu_plan_digest(jsonb);
DROP FUNCTION IF EXISTS public.fn_dot_iu_plan_moved(jsonb, jsonb);
DROP FUNCTION IF EXISTS public.fn_dot_iu_pin(text, jsonb, jsonb);
DROP FUNCTION IF EXISTS public.fn_dot_iu_approvers(jsonb, text);
DROP FUNCTION IF EXISTS public.fn_dot_iu_check_call(text, text, text);
DROP FUNCTION IF EXISTS public.fn_dot_iu_key_prior(text, text, text, text);
DROP FUNCTION IF EXISTS public.fn_dot_iu_record(text, text, text, text, text, text, jsonb, text, text[], text[]);
DROP FUNCTION IF EXISTS public.fn_dot_iu_evidence(text, jsonb, int, text, text[], timestamptz, jsonb);
DROP FUNCTION IF EXISTS public.fn_dot_iu_run_row(bigint, text, text, text[], text[], boolean, text);
DROP FUNCTION IF EXISTS public.fn_dot_iu_params_problem(jsonb, jsonb);
DROP FUNCTION IF EXISTS public.fn_dot_iu_params_digest(text, jsonb);
DROP TABLE IF EXISTS public.dot_schema_functions;
