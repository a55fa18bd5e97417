-- One failure row per job, however often it is written. A timed-out job
-- whose failure row could not be confirmed (the fail entry's own call was
-- cut off: it may have committed) owes that row, and the daemon writes it
-- again once the target answers. So the fail entry, under the key's lock,
-- returns the row this job (the job_id of its client facts) already has
-- under the key, as a replay, before writing a new one; a success under
-- the key still comes first (settlement).
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
    SELECT run_id, run_status, NULL::text AS class INTO v_prior FROM public.dot_iu_command_run
     WHERE idempotency_key = p_key AND run_mode = p_mode AND run_status IN ('planned', 'applied', 'verified')
       AND params_digest = v_digest;
    IF NOT FOUND AND jsonb_typeof(p_client -> 'job_id') = 'string' THEN
        SELECT run_id, run_status, evidence ->> 'error_class' AS class INTO v_prior FROM public.dot_iu_command_run
         WHERE idempotency_key = p_key AND run_mode = p_mode AND run_status IN ('failed', 'refused')
           AND params_digest = v_digest AND evidence ->> 'job_id' = p_client ->> 'job_id'
         ORDER BY run_id LIMIT 1;
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
