-- 003_ledger: the append-only run ledger, its only writer
-- (fn_dot_iu_command_log) and the apply transaction's guard
-- (fn_dot_iu_apply_begin).
--
-- SQLSTATEs raised here, read by the runtime:
--   GV001 a required gate is shut            -> refused (gate_closed)
--   GV002 an applied run with this key exists -> applied (the original run)
--   GV003 same key, other params digest       -> refused (idempotency_conflict)
--   GV004 catalog digest differs              -> refused (catalog_drift)
--   GV005 command not in the catalog          -> refused (unknown_command)
--   GV006 malformed ledger call               -> failed (ledger_rejected)

CREATE TABLE public.dot_iu_command_run (
    run_id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    command_name    text NOT NULL,
    run_mode        text NOT NULL CHECK (run_mode IN ('plan', 'apply', 'verify')),
    run_status      text NOT NULL CHECK (run_status IN ('planned', 'applied', 'verified', 'refused', 'failed')),
    actor           text NOT NULL,
    "session_user"  text NOT NULL DEFAULT session_user,
    params_digest   text NOT NULL CHECK (params_digest ~ '^[0-9a-f]{32}$'),
    idempotency_key text,
    gate_snapshot   jsonb NOT NULL,
    evidence        jsonb NOT NULL CHECK (jsonb_typeof(evidence) = 'object'),
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT dot_iu_command_run_mode_status CHECK (
        (run_mode = 'plan' AND run_status IN ('planned', 'refused'))
        OR (run_mode = 'apply' AND run_status IN ('applied', 'refused', 'failed'))
        OR (run_mode = 'verify' AND run_status IN ('verified', 'refused', 'failed'))
    )
);

CREATE INDEX dot_iu_command_run_command_idx ON public.dot_iu_command_run (command_name, created_at DESC);
CREATE INDEX dot_iu_command_run_status_idx ON public.dot_iu_command_run (run_status, created_at DESC);
-- A key is used up only by a run that succeeded; refused and failed runs
-- may be retried with the same key.
CREATE UNIQUE INDEX dot_iu_command_run_idempotency_idx ON public.dot_iu_command_run (idempotency_key, run_mode)
    WHERE idempotency_key IS NOT NULL AND run_status IN ('planned', 'applied', 'verified');

-- Append-only, even for the table's owner.
CREATE FUNCTION public.fn_dot_iu_command_run_immutable() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'GV007', MESSAGE = 'dot_iu_command_run is append-only';
END
$$;
CREATE TRIGGER dot_iu_command_run_no_update BEFORE UPDATE OR DELETE ON public.dot_iu_command_run
    FOR EACH ROW EXECUTE FUNCTION public.fn_dot_iu_command_run_immutable();
CREATE TRIGGER dot_iu_command_run_no_truncate BEFORE TRUNCATE ON public.dot_iu_command_run
    FOR EACH STATEMENT EXECUTE FUNCTION public.fn_dot_iu_command_run_immutable();

-- The ledger's only writer. Ungated (a refusal recorded while every gate is
-- shut must be recordable), fail-closed on vocabulary once the catalog is
-- seeded. Same key and same digest returns the original run and inserts
-- nothing; same key and another digest raises GV003.
CREATE FUNCTION public.fn_dot_iu_command_log(
    p_command_name    text,
    p_run_mode        text,
    p_run_status      text,
    p_actor           text,
    p_params_digest   text,
    p_idempotency_key text,
    p_evidence        jsonb
) RETURNS TABLE (run_id bigint, run_status text, replayed boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    v_prior public.dot_iu_command_run%ROWTYPE;
    v_id    bigint;
BEGIN
    IF p_command_name IS NULL OR p_run_mode IS NULL OR p_run_status IS NULL
       OR p_actor IS NULL OR p_actor = '' OR p_params_digest IS NULL OR p_evidence IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'GV006', MESSAGE = 'ledger call with a missing field';
    END IF;
    IF EXISTS (SELECT 1 FROM public.dot_iu_command_catalog)
       AND NOT EXISTS (SELECT 1 FROM public.dot_iu_command_catalog c WHERE c.command_name = p_command_name) THEN
        RAISE EXCEPTION USING ERRCODE = 'GV005', MESSAGE = 'command is not in the catalog';
    END IF;
    IF p_idempotency_key IS NOT NULL AND p_run_status IN ('planned', 'applied', 'verified') THEN
        PERFORM pg_advisory_xact_lock(hashtextextended('govsql:' || p_run_mode || ':' || p_idempotency_key, 0));
        SELECT * INTO v_prior FROM public.dot_iu_command_run r
         WHERE r.idempotency_key = p_idempotency_key AND r.run_mode = p_run_mode
           AND r.run_status IN ('planned', 'applied', 'verified');
        IF FOUND THEN
            IF v_prior.params_digest = p_params_digest THEN
                RETURN QUERY SELECT v_prior.run_id, v_prior.run_status, true;
                RETURN;
            END IF;
            RAISE EXCEPTION USING ERRCODE = 'GV003', MESSAGE = 'idempotency key already used with other params';
        END IF;
    END IF;
    INSERT INTO public.dot_iu_command_run
        (command_name, run_mode, run_status, actor, params_digest, idempotency_key, gate_snapshot, evidence)
    VALUES (p_command_name, p_run_mode, p_run_status, p_actor, p_params_digest, p_idempotency_key,
            (SELECT coalesce(jsonb_object_agg(key, value ORDER BY key), '{}'::jsonb) FROM public.dot_config),
            p_evidence)
    RETURNING dot_iu_command_run.run_id INTO v_id;
    RETURN QUERY SELECT v_id, p_run_status, false;
END
$$;

-- First statement of every apply transaction. Serialises runs of one key
-- (an orphaned transaction of an earlier attempt is waited for), then:
-- GV002 when the key was applied already, GV003 when it was applied with
-- other params, GV004 on catalog drift, GV001 when a gate is shut.
CREATE FUNCTION public.fn_dot_iu_apply_begin(
    p_idempotency_key text,
    p_params_digest   text,
    p_gates           text[],
    p_catalog_digest  text
) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    v_prior_digest text;
BEGIN
    IF p_idempotency_key IS NULL OR p_idempotency_key = '' THEN
        RAISE EXCEPTION USING ERRCODE = 'GV006', MESSAGE = 'apply needs an idempotency key';
    END IF;
    PERFORM pg_advisory_xact_lock(hashtextextended('govsql:apply:' || p_idempotency_key, 0));
    SELECT r.params_digest INTO v_prior_digest FROM public.dot_iu_command_run r
     WHERE r.idempotency_key = p_idempotency_key AND r.run_mode = 'apply' AND r.run_status = 'applied';
    IF FOUND THEN
        IF v_prior_digest = p_params_digest THEN
            RAISE EXCEPTION USING ERRCODE = 'GV002', MESSAGE = 'already applied';
        END IF;
        RAISE EXCEPTION USING ERRCODE = 'GV003', MESSAGE = 'idempotency key already used with other params';
    END IF;
    IF p_catalog_digest IS DISTINCT FROM public.fn_dot_iu_catalog_digest() THEN
        RAISE EXCEPTION USING ERRCODE = 'GV004', MESSAGE = 'catalog drift';
    END IF;
    PERFORM public.fn_dot_iu_gate_assert(ARRAY['iu_core.operator_runtime_enabled'] || p_gates);
    RETURN true;
END
$$;

REVOKE ALL ON TABLE public.dot_iu_command_run FROM PUBLIC;
REVOKE ALL ON FUNCTION public.fn_dot_iu_command_run_immutable() FROM PUBLIC;
REVOKE ALL ON FUNCTION public.fn_dot_iu_command_log(text, text, text, text, text, text, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION public.fn_dot_iu_apply_begin(text, text, text[], text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION public.fn_dot_iu_command_log(text, text, text, text, text, text, jsonb) TO :"runtime_role";
GRANT EXECUTE ON FUNCTION public.fn_dot_iu_apply_begin(text, text, text[], text) TO :"runtime_role";
