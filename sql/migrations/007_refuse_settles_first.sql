-- A job that may have run is settled by its key before anything local may
-- refuse it. The daemon records its refusals (kill switch, approval
-- expiry, cancel, access) through fn_dot_iu_refuse; an apply re-run after
-- a crash, or one whose earlier attempt was cut off, may have committed
-- (an orphaned transaction that held the key's lock). So the refuse entry
-- now takes the key's lock first, as the fail entry does: when the same
-- key and params already succeeded in this mode, it returns that run
-- (replayed) and writes nothing; otherwise it writes the refused row.
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
        'approval_expired', 'rejected', 'cancelled', 'kill_switch', 'log_exposure') THEN
        RAISE EXCEPTION USING ERRCODE = 'GV006', MESSAGE = 'not a refusal class';
    END IF;
    c := public.fn_dot_iu_entry_command(p_command);
    v_digest := public.fn_dot_iu_params_digest(p_command, p_params);
    PERFORM pg_advisory_xact_lock(hashtextextended('govsql:' || p_mode || ':' || p_key, 0));
    SELECT run_id, run_status INTO v_prior FROM public.dot_iu_command_run
     WHERE idempotency_key = p_key AND run_mode = p_mode AND run_status IN ('planned', 'applied', 'verified')
       AND params_digest = v_digest;
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
