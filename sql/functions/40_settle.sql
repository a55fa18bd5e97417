-- The entries that record what the daemon saw, each settling by key first
-- (a job that may have run is answered from the ledger before anything is
-- written): fn_dot_iu_refuse (a refusal: kill switch, approval, cancel,
-- access) and fn_dot_iu_fail (a failure: timeout, lost target).
--
-- A repeatable file (CREATE OR REPLACE only): see src/migrate.rs.

-- The refuse entry: settles by key first, its actor's key only; it also
-- records `unknown_command` (a job whose command left the
-- daemon's catalog while it waited, the database still knowing it).
CREATE OR REPLACE FUNCTION public.fn_dot_iu_refuse(
    p_mode text, p_command text, p_params jsonb, p_key text, p_actor text, p_class text, p_client jsonb
) RETURNS TABLE (kind text, value text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    c public.dot_iu_command_catalog%ROWTYPE;
    v_digest text;
    v_prior record;
BEGIN
    PERFORM public.fn_dot_iu_check_call(p_mode, p_key, p_actor);
    IF p_class IS NULL OR p_class NOT IN ('bad_params', 'unsafe_plan', 'not_allowed', 'approval_missing',
        'approval_expired', 'rejected', 'cancelled', 'kill_switch', 'log_exposure', 'unknown_command') THEN
        RAISE EXCEPTION USING ERRCODE = 'GV006', MESSAGE = 'not a refusal class';
    END IF;
    c := public.fn_dot_iu_entry_command(p_command);
    v_digest := public.fn_dot_iu_params_digest(p_command, p_params);
    PERFORM pg_advisory_xact_lock(hashtextextended('govsql:' || p_mode || ':' || p_key, 0));
    SELECT * INTO v_prior FROM public.fn_dot_iu_key_prior(p_mode, p_key, p_actor, v_digest) WHERE replay;
    kind := 'run';
    IF FOUND THEN
        value := public.fn_dot_iu_run_row(v_prior.run_id, v_prior.run_status, NULL, NULL, NULL, true, v_digest);
    ELSE
        value := public.fn_dot_iu_record(p_command, p_mode, 'refused', p_actor, v_digest, p_key,
            public.fn_dot_iu_evidence(p_mode, p_client, cardinality(c.statements), p_class, NULL, clock_timestamp(), NULL),
            p_class, NULL, NULL);
    END IF;
    RETURN NEXT;
END
$$;

-- The fail entry: settles by key first (its actor's key only), then
-- returns this job's own failure row if it has one (a row whose write was
-- cut off is written again: one row per job); a timed-out job is settled
-- only once no backend carries its tag (GV010 otherwise).
CREATE OR REPLACE FUNCTION public.fn_dot_iu_fail(
    p_mode text, p_command text, p_params jsonb, p_key text, p_actor text, p_class text, p_client jsonb
) RETURNS TABLE (kind text, value text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    c public.dot_iu_command_catalog%ROWTYPE;
    v_digest text;
    v_prior record;
BEGIN
    PERFORM public.fn_dot_iu_check_call(p_mode, p_key, p_actor);
    IF p_class IS NULL OR (p_class NOT IN ('timeout', 'target_unreachable', 'db_unavailable', 'result_too_large',
        'host_key', 'ssh_auth', 'internal') AND p_class !~ '^[0-9A-Z]{5}$') THEN
        RAISE EXCEPTION USING ERRCODE = 'GV006', MESSAGE = 'not a failure class';
    END IF;
    c := public.fn_dot_iu_entry_command(p_command);
    v_digest := public.fn_dot_iu_params_digest(p_command, p_params);
    PERFORM pg_advisory_xact_lock(hashtextextended('govsql:' || p_mode || ':' || p_key, 0));
    -- A timed-out job is settled here only once no backend of it is left:
    -- a backend frozen with its call still unread would take the key's
    -- lock after this row and commit.
    IF p_class = 'timeout' AND jsonb_typeof(p_client -> 'job_id') = 'string' AND EXISTS (
        SELECT 1 FROM pg_stat_activity
         WHERE application_name = 'govsql:' || (p_client ->> 'job_id') AND pid <> pg_backend_pid()) THEN
        RAISE EXCEPTION USING ERRCODE = 'GV010', MESSAGE = 'a backend of the job is still there';
    END IF;
    SELECT p.run_id, p.run_status, NULL::text AS class INTO v_prior
      FROM public.fn_dot_iu_key_prior(p_mode, p_key, p_actor, v_digest) AS p WHERE p.replay;
    IF NOT FOUND AND jsonb_typeof(p_client -> 'job_id') = 'string' THEN
        SELECT r.run_id, r.run_status, r.evidence ->> 'error_class' AS class INTO v_prior
          FROM public.dot_iu_command_run r
         WHERE r.idempotency_key = p_key AND r.run_mode = p_mode AND r.run_status IN ('failed', 'refused')
           AND r.actor = p_actor AND r.params_digest = v_digest AND r.evidence ->> 'job_id' = p_client ->> 'job_id'
         ORDER BY r.run_id LIMIT 1;
    END IF;
    kind := 'run';
    IF FOUND THEN
        value := public.fn_dot_iu_run_row(v_prior.run_id, v_prior.run_status, v_prior.class, NULL, NULL, true, v_digest);
    ELSE
        value := public.fn_dot_iu_record(p_command, p_mode, CASE WHEN p_mode = 'plan' THEN 'refused' ELSE 'failed' END,
            p_actor, v_digest, p_key,
            public.fn_dot_iu_evidence(p_mode, p_client, cardinality(c.statements), p_class, NULL, clock_timestamp(), NULL),
            p_class, NULL, NULL);
    END IF;
    RETURN NEXT;
END
$$;
