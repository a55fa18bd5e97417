-- The entries as the daemon calls them: each takes ONE jsonb object, the
-- serialized struct of its call (src/runtime/calls.rs), so that a new
-- argument is a new field, not a new signature. Each refuses a call that
-- is not an object or carries a field it does not know (GV006: a daemon
-- newer than this database's functions; run `govsql migrate`), then calls
-- the positional entry of the same name (30_dispatch, 40_settle,
-- 60_reads), which a daemon of an earlier release still calls during an
-- upgrade.
--
-- A repeatable file (CREATE OR REPLACE only): see src/migrate.rs.

-- The field check of every call.
CREATE OR REPLACE FUNCTION public.fn_dot_iu_call_fields(p_call jsonb, p_known text[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF jsonb_typeof(p_call) IS DISTINCT FROM 'object'
       OR EXISTS (SELECT 1 FROM jsonb_object_keys(p_call) AS k WHERE k <> ALL (p_known)) THEN
        RAISE EXCEPTION USING ERRCODE = 'GV006',
            MESSAGE = 'an entry call that is not one object of the fields this database knows; run govsql migrate';
    END IF;
END
$$;

-- plan, apply or verify: {mode, command, params, key, actor,
-- catalog_digest, allow_log_exposure, max_result_bytes, client}.
CREATE OR REPLACE FUNCTION public.fn_dot_iu_dispatch(p_call jsonb) RETURNS TABLE (kind text, value text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    PERFORM public.fn_dot_iu_call_fields(p_call, ARRAY['mode', 'command', 'params', 'key', 'actor',
        'catalog_digest', 'allow_log_exposure', 'max_result_bytes', 'client']);
    RETURN QUERY SELECT d.kind, d.value FROM public.fn_dot_iu_dispatch(
        p_call ->> 'mode', p_call ->> 'command', p_call -> 'params', p_call ->> 'key', p_call ->> 'actor',
        p_call ->> 'catalog_digest', (p_call ->> 'allow_log_exposure')::boolean,
        (p_call ->> 'max_result_bytes')::bigint, p_call -> 'client') AS d;
END
$$;

-- A refusal: {mode, command, params, key, actor, class, client}.
CREATE OR REPLACE FUNCTION public.fn_dot_iu_refuse(p_call jsonb) RETURNS TABLE (kind text, value text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    PERFORM public.fn_dot_iu_call_fields(p_call, ARRAY['mode', 'command', 'params', 'key', 'actor', 'class', 'client']);
    RETURN QUERY SELECT d.kind, d.value FROM public.fn_dot_iu_refuse(
        p_call ->> 'mode', p_call ->> 'command', p_call -> 'params', p_call ->> 'key', p_call ->> 'actor',
        p_call ->> 'class', p_call -> 'client') AS d;
END
$$;

-- A failure: {mode, command, params, key, actor, class, client}.
CREATE OR REPLACE FUNCTION public.fn_dot_iu_fail(p_call jsonb) RETURNS TABLE (kind text, value text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    PERFORM public.fn_dot_iu_call_fields(p_call, ARRAY['mode', 'command', 'params', 'key', 'actor', 'class', 'client']);
    RETURN QUERY SELECT d.kind, d.value FROM public.fn_dot_iu_fail(
        p_call ->> 'mode', p_call ->> 'command', p_call -> 'params', p_call ->> 'key', p_call ->> 'actor',
        p_call ->> 'class', p_call -> 'client') AS d;
END
$$;

-- A plan pinned at submit: {command, params, client}.
CREATE OR REPLACE FUNCTION public.fn_dot_iu_pin(p_call jsonb) RETURNS TABLE (kind text, value text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    PERFORM public.fn_dot_iu_call_fields(p_call, ARRAY['command', 'params', 'client']);
    RETURN QUERY SELECT d.kind, d.value FROM public.fn_dot_iu_pin(
        p_call ->> 'command', p_call -> 'params', p_call -> 'client') AS d;
END
$$;

-- `govsql log`: {filter, limit}.
CREATE OR REPLACE FUNCTION public.fn_dot_iu_ledger(p_call jsonb) RETURNS TABLE (kind text, value text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    PERFORM public.fn_dot_iu_call_fields(p_call, ARRAY['filter', 'limit']);
    RETURN QUERY SELECT d.kind, d.value FROM public.fn_dot_iu_ledger(p_call -> 'filter', (p_call ->> 'limit')::int) AS d;
END
$$;
