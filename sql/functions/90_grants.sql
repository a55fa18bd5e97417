-- Who owns and who may call the repeatable functions, applied after them
-- whenever any of them was (re)applied. Every function here is SECURITY
-- DEFINER or called by one, owned by the NOLOGIN role govsql_owner (005),
-- and executable by nobody else but the runtime role's entries: the
-- dispatcher, the refuse and fail entries, the status, the ledger, the
-- pin, and the per-job preflight (each entry in its one-object form,
-- 70_calls, and in the positional form an earlier release calls). psql variable :runtime_role names the runtime
-- role.
REVOKE ALL ON FUNCTION public.fn_dot_iu_params_digest(text, jsonb),
    public.fn_dot_iu_params_problem(jsonb, jsonb),
    public.fn_dot_iu_run_row(bigint, text, text, text[], text[], boolean, text),
    public.fn_dot_iu_evidence(text, jsonb, int, text, text[], timestamptz, jsonb),
    public.fn_dot_iu_record(text, text, text, text, text, text, jsonb, text, text[], text[]),
    public.fn_dot_iu_key_prior(text, text, text, text),
    public.fn_dot_iu_check_call(text, text, text), public.fn_dot_iu_entry_command(text),
    public.fn_dot_iu_rows_touched(), public.fn_dot_iu_rows_changed(jsonb, jsonb),
    public.fn_dot_iu_freezes(text, text, timestamptz),
    public.fn_dot_iu_plan_facts(public.dot_iu_command_catalog, text, text, text),
    public.fn_dot_iu_plan_digest(jsonb), public.fn_dot_iu_plan_moved(jsonb, jsonb),
    public.fn_dot_iu_pin(text, jsonb, jsonb), public.fn_dot_iu_approvers(jsonb, text),
    public.fn_dot_iu_dispatch(text, text, jsonb, text, text, text, boolean, bigint, jsonb),
    public.fn_dot_iu_refuse(text, text, jsonb, text, text, text, jsonb),
    public.fn_dot_iu_fail(text, text, jsonb, text, text, text, jsonb),
    public.fn_dot_iu_command_resolves(text[], text[], text[]), public.fn_dot_iu_catalog_resolve(text),
    public.fn_dot_iu_log_exposure(), public.fn_dot_iu_preflight(), public.fn_dot_iu_status(),
    public.fn_dot_iu_ledger(jsonb, int), public.fn_dot_iu_call_fields(jsonb, text[]),
    public.fn_dot_iu_dispatch(jsonb), public.fn_dot_iu_refuse(jsonb), public.fn_dot_iu_fail(jsonb),
    public.fn_dot_iu_pin(jsonb), public.fn_dot_iu_ledger(jsonb) FROM PUBLIC;
ALTER FUNCTION public.fn_dot_iu_params_digest(text, jsonb) OWNER TO govsql_owner;
ALTER FUNCTION public.fn_dot_iu_params_problem(jsonb, jsonb) OWNER TO govsql_owner;
ALTER FUNCTION public.fn_dot_iu_run_row(bigint, text, text, text[], text[], boolean, text) OWNER TO govsql_owner;
ALTER FUNCTION public.fn_dot_iu_evidence(text, jsonb, int, text, text[], timestamptz, jsonb) OWNER TO govsql_owner;
ALTER FUNCTION public.fn_dot_iu_record(text, text, text, text, text, text, jsonb, text, text[], text[]) OWNER TO govsql_owner;
ALTER FUNCTION public.fn_dot_iu_key_prior(text, text, text, text) OWNER TO govsql_owner;
ALTER FUNCTION public.fn_dot_iu_check_call(text, text, text) OWNER TO govsql_owner;
ALTER FUNCTION public.fn_dot_iu_entry_command(text) OWNER TO govsql_owner;
ALTER FUNCTION public.fn_dot_iu_rows_touched() OWNER TO govsql_owner;
ALTER FUNCTION public.fn_dot_iu_rows_changed(jsonb, jsonb) OWNER TO govsql_owner;
ALTER FUNCTION public.fn_dot_iu_freezes(text, text, timestamptz) OWNER TO govsql_owner;
ALTER FUNCTION public.fn_dot_iu_plan_facts(public.dot_iu_command_catalog, text, text, text) OWNER TO govsql_owner;
ALTER FUNCTION public.fn_dot_iu_plan_digest(jsonb) OWNER TO govsql_owner;
ALTER FUNCTION public.fn_dot_iu_plan_moved(jsonb, jsonb) OWNER TO govsql_owner;
ALTER FUNCTION public.fn_dot_iu_pin(text, jsonb, jsonb) OWNER TO govsql_owner;
ALTER FUNCTION public.fn_dot_iu_approvers(jsonb, text) OWNER TO govsql_owner;
ALTER FUNCTION public.fn_dot_iu_dispatch(text, text, jsonb, text, text, text, boolean, bigint, jsonb) OWNER TO govsql_owner;
ALTER FUNCTION public.fn_dot_iu_refuse(text, text, jsonb, text, text, text, jsonb) OWNER TO govsql_owner;
ALTER FUNCTION public.fn_dot_iu_fail(text, text, jsonb, text, text, text, jsonb) OWNER TO govsql_owner;
ALTER FUNCTION public.fn_dot_iu_command_resolves(text[], text[], text[]) OWNER TO govsql_owner;
ALTER FUNCTION public.fn_dot_iu_log_exposure() OWNER TO govsql_owner;
ALTER FUNCTION public.fn_dot_iu_preflight() OWNER TO govsql_owner;
ALTER FUNCTION public.fn_dot_iu_status() OWNER TO govsql_owner;
ALTER FUNCTION public.fn_dot_iu_ledger(jsonb, int) OWNER TO govsql_owner;
ALTER FUNCTION public.fn_dot_iu_call_fields(jsonb, text[]) OWNER TO govsql_owner;
ALTER FUNCTION public.fn_dot_iu_dispatch(jsonb) OWNER TO govsql_owner;
ALTER FUNCTION public.fn_dot_iu_refuse(jsonb) OWNER TO govsql_owner;
ALTER FUNCTION public.fn_dot_iu_fail(jsonb) OWNER TO govsql_owner;
ALTER FUNCTION public.fn_dot_iu_pin(jsonb) OWNER TO govsql_owner;
ALTER FUNCTION public.fn_dot_iu_ledger(jsonb) OWNER TO govsql_owner;
GRANT EXECUTE ON FUNCTION public.fn_dot_iu_dispatch(text, text, jsonb, text, text, text, boolean, bigint, jsonb),
    public.fn_dot_iu_refuse(text, text, jsonb, text, text, text, jsonb),
    public.fn_dot_iu_fail(text, text, jsonb, text, text, text, jsonb),
    public.fn_dot_iu_status(), public.fn_dot_iu_ledger(jsonb, int),
    public.fn_dot_iu_preflight(), public.fn_dot_iu_pin(text, jsonb, jsonb),
    public.fn_dot_iu_dispatch(jsonb), public.fn_dot_iu_refuse(jsonb), public.fn_dot_iu_fail(jsonb),
    public.fn_dot_iu_pin(jsonb), public.fn_dot_iu_ledger(jsonb) TO :"runtime_role";
