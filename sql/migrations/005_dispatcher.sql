-- 005_dispatcher: the rules, enforced by PostgreSQL itself.
--
-- The runtime role may EXECUTE these four functions and nothing else:
--   fn_dot_iu_dispatch  plan / apply / verify one governed command, in one
--                       transaction with its ledger row;
--   fn_dot_iu_refuse    record a refusal the daemon found (kill switch,
--                       approval, cancel, access): a refused row only;
--   fn_dot_iu_fail      record a failure the daemon saw (timeout, lost
--                       target): a failed row, unless the key was applied
--                       (then the original run: this is settlement);
--   fn_dot_iu_ledger    the ledger for `govsql log` (no values: there are none)
--   fn_dot_iu_status    the catalog digest, unavailable commands, log
--                       exposure and the caller's excess privileges.
-- They are SECURITY DEFINER, owned by the NOLOGIN role govsql_owner, which
-- holds EXECUTE on the governed functions; the runtime role holds none.
--
-- Each returns rows (kind, value): 'row' rows carry a command's result
-- values as text, then one 'run' row carries a JSON object: run_id,
-- status, class, closed_gates, reasons, replayed, params_digest.
--
-- psql variables: :runtime_role, :secret (32 random bytes, hex, generated
-- by govsql migrate for the keyed params digest).

-- The substrate owner: never logs in. Cluster-wide, created once (two
-- databases migrated at the same moment may race for it).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'govsql_owner') THEN
        CREATE ROLE govsql_owner NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$;

-- What the dispatcher needs to know of a command beyond 002's columns.
ALTER TABLE public.dot_iu_command_catalog
    ADD COLUMN statements      text[] NOT NULL DEFAULT '{}',
    ADD COLUMN statement_kinds text[] NOT NULL DEFAULT '{}',
    ADD COLUMN param_specs     jsonb  NOT NULL DEFAULT '[]',
    ADD COLUMN expect_status   text[] NOT NULL DEFAULT '{ok}',
    ADD COLUMN unavailable     boolean NOT NULL DEFAULT false;

-- The per-database secret of the keyed params digest; only the owner reads it.
CREATE TABLE public.dot_iu_secret (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    secret    text NOT NULL CHECK (secret ~ '^[0-9a-f]{64}$')
);
INSERT INTO public.dot_iu_secret (secret) VALUES (:'secret');

-- md5 hex of the secret followed by the compact JSON
-- [command, [[key, value], ...]], keys sorted bytewise, values as text
-- (params that are not a JSON object count as none).
--
-- The helpers the entries call on every job are PL/pgSQL, not SQL: a SQL
-- function that cannot be inlined (SECURITY DEFINER, a SET clause) parses
-- and plans its body again in every transaction, while PL/pgSQL keeps its
-- plans for the life of the session (session mode: ~0.2-0.3 ms each, per
-- job, measured here).
CREATE FUNCTION public.fn_dot_iu_params_digest(p_command text, p_params jsonb) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    RETURN md5(
        (SELECT secret FROM public.dot_iu_secret)
        || '[' || to_json(p_command)::text || ',['
        || coalesce((SELECT string_agg('[' || to_json(e.key)::text || ',' || to_json(e.value)::text || ']', ','
                                       ORDER BY e.key COLLATE "C", e.value COLLATE "C")
                     FROM jsonb_each_text(CASE WHEN jsonb_typeof(p_params) = 'object' THEN p_params
                                               ELSE '{}'::jsonb END) AS e), '')
        || ']]');
END
$$;

-- Why the params do not fit the command's specs, as a fixed phrase with
-- a declared param name at most (never a value); NULL when they fit.
CREATE FUNCTION public.fn_dot_iu_params_problem(p_specs jsonb, p_params jsonb) RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = public, pg_temp AS $$
DECLARE
    v_key  text;
    v_spec jsonb;
    v_val  text;
    v_type text;
BEGIN
    IF p_params IS NULL OR jsonb_typeof(p_params) <> 'object' THEN
        RETURN 'params must be one JSON object';
    END IF;
    FOR v_key IN SELECT jsonb_object_keys(p_params) LOOP
        SELECT e INTO v_spec FROM jsonb_array_elements(p_specs) AS e WHERE e ->> 'name' = v_key;
        IF v_spec IS NULL THEN
            RETURN 'a param the command does not declare';
        END IF;
        IF jsonb_typeof(p_params -> v_key) <> 'string' THEN
            RETURN 'param ' || v_key || ' must be given as a string';
        END IF;
        v_val := p_params ->> v_key;
        v_type := v_spec ->> 'type';
        IF octet_length(v_val) > least(coalesce((v_spec ->> 'max_len')::bigint, 1048576), 1048576) THEN
            RETURN 'param ' || v_key || ' is over its length limit';
        END IF;
        IF (v_type = 'bigint' AND v_val !~ '^-?[0-9]{1,19}$')
           OR (v_type = 'uuid' AND v_val !~ '^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$')
           OR (v_type = 'boolean' AND v_val NOT IN ('true', 'false')) THEN
            RETURN 'param ' || v_key || ' is not a valid ' || v_type;
        END IF;
        IF v_type IN ('bigint', 'jsonb') THEN
            BEGIN
                IF v_type = 'bigint' THEN PERFORM v_val::bigint; ELSE PERFORM v_val::jsonb; END IF;
            EXCEPTION WHEN OTHERS THEN
                RETURN 'param ' || v_key || ' is not a valid ' || v_type;
            END;
        END IF;
    END LOOP;
    FOR v_spec IN SELECT e FROM jsonb_array_elements(p_specs) AS e LOOP
        IF coalesce((v_spec ->> 'required')::boolean, true) AND NOT p_params ? (v_spec ->> 'name') THEN
            RETURN 'missing required param ' || (v_spec ->> 'name');
        END IF;
    END LOOP;
    RETURN NULL;
END
$$;

-- The logging settings of this session that could write a statement, a
-- bind parameter or an error's statement to the server log.
CREATE FUNCTION public.fn_dot_iu_log_exposure() RETURNS text[]
LANGUAGE plpgsql STABLE SET search_path = public, pg_temp AS $$
BEGIN
    RETURN (SELECT coalesce(array_agg(problem ORDER BY problem), ARRAY[]::text[]) FROM (
        SELECT 'log_statement' AS problem WHERE current_setting('log_statement') <> 'none'
        UNION ALL SELECT 'log_min_error_statement' WHERE current_setting('log_min_error_statement') <> 'panic'
        UNION ALL SELECT 'log_min_duration_statement' WHERE current_setting('log_min_duration_statement') <> '-1'
        UNION ALL SELECT 'log_min_duration_sample' WHERE current_setting('log_min_duration_sample') <> '-1'
        UNION ALL SELECT 'log_parameter_max_length' WHERE current_setting('log_parameter_max_length') <> '0'
        UNION ALL SELECT 'log_parameter_max_length_on_error' WHERE current_setting('log_parameter_max_length_on_error') <> '0'
        UNION ALL SELECT 'pgaudit' WHERE coalesce(current_setting('pgaudit.log', true), 'none') NOT IN ('none', '')
        UNION ALL SELECT 'auto_explain' WHERE coalesce(current_setting('auto_explain.log_min_duration', true), '-1') <> '-1'
    ) AS p);
END
$$;

-- The one 'run' row every entry ends with.
CREATE FUNCTION public.fn_dot_iu_run_row(
    p_run_id bigint, p_status text, p_class text, p_closed text[], p_reasons text[],
    p_replayed boolean, p_digest text
) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('run_id', p_run_id, 'status', p_status, 'class', p_class,
        'closed_gates', to_jsonb(coalesce(p_closed, ARRAY[]::text[])),
        'reasons', to_jsonb(coalesce(p_reasons, ARRAY[]::text[])),
        'replayed', p_replayed, 'params_digest', p_digest)::text
$$;

-- Evidence: the database's own structural facts, plus the few facts only
-- the daemon knows (job id, transport, target, host key, approver, the
-- job's submit and end times, time spent before the call), each a short
-- scalar. Never a value.
CREATE FUNCTION public.fn_dot_iu_evidence(
    p_mode text, p_client jsonb, p_statements int, p_class text, p_closed text[],
    p_started timestamptz, p_extra jsonb
) RETURNS jsonb
LANGUAGE plpgsql STABLE SET search_path = public, pg_temp AS $$
BEGIN
    RETURN coalesce((
        SELECT jsonb_object_agg(e.key, e.value) FROM jsonb_each(coalesce(p_client, '{}'::jsonb)) AS e
        WHERE e.key IN ('job_id', 'transport', 'target', 'host_key', 'approved_by', 'submitted_at', 'ended_at', 'reason')
          AND jsonb_typeof(e.value) = 'string' AND length(e.value #>> '{}') <= 200
    ), '{}'::jsonb)
    || jsonb_build_object(
        'mode', p_mode,
        'statement_count', p_statements,
        'error_class', p_class,
        'closed_gates', to_jsonb(coalesce(p_closed, ARRAY[]::text[])),
        'catalog_digest', coalesce((SELECT digest FROM public.dot_iu_catalog_state), ''),
        'duration_ms', coalesce(CASE WHEN jsonb_typeof(p_client -> 'duration_ms') = 'number'
                                     THEN least(greatest((p_client ->> 'duration_ms')::numeric, 0), 1e12)::bigint END, 0)
                       + round(extract(epoch FROM clock_timestamp() - p_started) * 1000)::bigint)
    || coalesce(p_extra, '{}'::jsonb);
END
$$;

-- Writes one ledger row through the log function; returns its 'run' row.
CREATE FUNCTION public.fn_dot_iu_record(
    p_command text, p_mode text, p_status text, p_actor text, p_digest text, p_key text,
    p_evidence jsonb, p_class text, p_closed text[], p_reasons text[]
) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    v_run bigint;
    v_status text;
    v_replayed boolean;
BEGIN
    SELECT l.run_id, l.run_status, l.replayed INTO v_run, v_status, v_replayed
      FROM public.fn_dot_iu_command_log(p_command, p_mode, p_status, p_actor, p_digest, p_key, p_evidence) AS l;
    RETURN public.fn_dot_iu_run_row(v_run, v_status, p_class, p_closed, p_reasons, v_replayed, p_digest);
END
$$;

-- Shared entry checks: mode, actor and key are runtime-owned words.
CREATE FUNCTION public.fn_dot_iu_check_call(p_mode text, p_key text, p_actor text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_mode IS NULL OR p_mode NOT IN ('plan', 'apply', 'verify')
       OR p_key IS NULL OR p_key !~ '^[A-Za-z0-9._:@-]{1,128}$'
       OR p_actor IS NULL OR p_actor !~ '^[A-Za-z0-9._:@-]{1,128}$' THEN
        RAISE EXCEPTION USING ERRCODE = 'GV006', MESSAGE = 'malformed governed call';
    END IF;
END
$$;

-- The catalog row of a command an entry was called for. The vocabulary is
-- fail-closed: an unknown or retired command cannot be logged (GV005).
CREATE FUNCTION public.fn_dot_iu_entry_command(p_command text) RETURNS public.dot_iu_command_catalog
LANGUAGE plpgsql STABLE SET search_path = public, pg_temp AS $$
DECLARE
    c public.dot_iu_command_catalog%ROWTYPE;
BEGIN
    SELECT * INTO c FROM public.dot_iu_command_catalog WHERE command_name = p_command AND NOT retired;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'GV005', MESSAGE = 'command is not in the catalog';
    END IF;
    RETURN c;
END
$$;

-- The dispatcher. One call = one job = one transaction = one ledger row.
CREATE FUNCTION public.fn_dot_iu_dispatch(
    p_mode             text,
    p_command          text,
    p_params           jsonb,
    p_key              text,
    p_actor            text,
    p_catalog_digest   text,
    p_allow_log_exposure boolean,
    p_max_result_bytes bigint,
    p_client           jsonb
) RETURNS TABLE (kind text, value text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    c          public.dot_iu_command_catalog%ROWTYPE;
    v_started  timestamptz := clock_timestamp();
    v_digest   text;
    v_problem  text;
    v_prior    record;
    v_closed   text[] := ARRAY[]::text[];
    v_reasons  text[] := ARRAY[]::text[];
    v_rows     text[] := ARRAY[]::text[];
    v_class    text;
    v_status   text;
    v_word     text;
    v_extra    jsonb := '{}'::jsonb;
    v_i        int;
    v_sql      text;
    r          record;
    v_ok       boolean := true;
    v_bytes    bigint := 0;
BEGIN
    PERFORM public.fn_dot_iu_check_call(p_mode, p_key, p_actor);
    c := public.fn_dot_iu_entry_command(p_command);
    v_problem := public.fn_dot_iu_params_problem(c.param_specs, p_params);
    v_digest := public.fn_dot_iu_params_digest(p_command, p_params);
    IF v_problem IS NOT NULL THEN
        v_class := 'bad_params';
    ELSIF p_mode = 'verify' AND c.mutating THEN
        v_class := 'unsafe_plan';
    END IF;
    IF v_class IS NOT NULL THEN
        kind := 'run';
        value := public.fn_dot_iu_record(p_command, p_mode, 'refused', p_actor, v_digest, p_key,
            public.fn_dot_iu_evidence(p_mode, p_client, cardinality(c.statements), v_class, NULL, v_started, NULL),
            v_class, NULL, ARRAY[v_problem]);
        RETURN NEXT;
        RETURN;
    END IF;

    -- Idempotency: one run per (key, mode); an orphaned transaction of an
    -- earlier attempt is waited for here.
    PERFORM pg_advisory_xact_lock(hashtextextended('govsql:' || p_mode || ':' || p_key, 0));
    SELECT run_id, run_status, params_digest INTO v_prior FROM public.dot_iu_command_run
     WHERE idempotency_key = p_key AND run_mode = p_mode AND run_status IN ('planned', 'applied', 'verified');
    IF FOUND THEN
        kind := 'run';
        IF v_prior.params_digest = v_digest THEN
            value := public.fn_dot_iu_run_row(v_prior.run_id, v_prior.run_status, NULL, NULL, NULL, true, v_digest);
        ELSE
            value := public.fn_dot_iu_record(p_command, p_mode, 'refused', p_actor, v_digest, p_key,
                public.fn_dot_iu_evidence(p_mode, p_client, cardinality(c.statements), 'idempotency_conflict', NULL, v_started, NULL),
                'idempotency_conflict', NULL, NULL);
        END IF;
        RETURN NEXT;
        RETURN;
    END IF;

    -- What would refuse an apply now.
    IF c.unavailable THEN
        v_reasons := array_append(v_reasons, 'target_missing');
    END IF;
    IF p_catalog_digest IS DISTINCT FROM coalesce((SELECT digest FROM public.dot_iu_catalog_state), '') THEN
        v_reasons := array_append(v_reasons, 'catalog_drift');
    END IF;
    IF p_mode = 'apply' THEN
        -- Open gate rows are locked FOR SHARE: a gate cannot be shut under
        -- us. A shut one raises, and is named just below.
        BEGIN
            PERFORM public.fn_dot_iu_gate_assert(c.required_gates);
        EXCEPTION WHEN SQLSTATE 'GV001' THEN
            NULL;
        END;
    END IF;
    -- Missing gates count as shut.
    SELECT coalesce(array_agg(DISTINCT g ORDER BY g), ARRAY[]::text[]) INTO v_closed
      FROM unnest(c.required_gates) AS g
     WHERE NOT EXISTS (SELECT 1 FROM public.dot_config d WHERE d.key = g AND d.value = 'true');
    IF cardinality(v_closed) > 0 THEN
        v_reasons := array_append(v_reasons, 'gate_closed');
    END IF;
    IF NOT coalesce(p_allow_log_exposure, false) AND cardinality(public.fn_dot_iu_log_exposure()) > 0 THEN
        v_reasons := array_append(v_reasons, 'log_exposure');
    END IF;
    IF p_mode = 'apply' AND EXISTS (SELECT 1 FROM public.dot_iu_command_run
        WHERE idempotency_key = p_key AND run_mode = 'apply' AND run_status = 'applied' AND params_digest <> v_digest) THEN
        v_reasons := array_append(v_reasons, 'idempotency_conflict');
    END IF;

    IF p_mode = 'plan' THEN
        kind := 'run';
        value := public.fn_dot_iu_record(p_command, p_mode, 'planned', p_actor, v_digest, p_key,
            public.fn_dot_iu_evidence(p_mode, p_client, cardinality(c.statements), NULL, v_closed, v_started,
                jsonb_build_object('reasons', to_jsonb(v_reasons))),
            NULL, v_closed, v_reasons);
        RETURN NEXT;
        RETURN;
    END IF;

    -- apply refuses on any reason; verify only on what makes it unsafe to run.
    IF p_mode = 'apply' AND cardinality(v_reasons) > 0 THEN
        v_class := CASE
            WHEN 'target_missing' = ANY (v_reasons) THEN 'target_missing'
            WHEN 'catalog_drift' = ANY (v_reasons) THEN 'catalog_drift'
            WHEN 'gate_closed' = ANY (v_reasons) THEN 'gate_closed'
            ELSE v_reasons[1] END;
    ELSIF p_mode = 'verify' AND 'target_missing' = ANY (v_reasons) THEN
        v_class := 'target_missing';
    END IF;
    IF v_class IS NOT NULL THEN
        kind := 'run';
        value := public.fn_dot_iu_record(p_command, p_mode, 'refused', p_actor, v_digest, p_key,
            public.fn_dot_iu_evidence(p_mode, p_client, cardinality(c.statements), v_class, v_closed, v_started, NULL),
            v_class, v_closed, v_reasons);
        RETURN NEXT;
        RETURN;
    END IF;

    -- Run the stored statements with the params bound, never spliced.
    BEGIN
        IF p_mode = 'verify' THEN
            -- Read-only, enforced by PostgreSQL; the block is rolled back
            -- (GV090) so the ledger write below is allowed again.
            PERFORM set_config('transaction_read_only', 'on', true);
        END IF;
        FOR v_i IN 1 .. cardinality(c.statements) LOOP
            v_sql := c.statements[v_i];
            IF c.statement_kinds[v_i] = 'do' THEN
                EXECUTE v_sql;
                CONTINUE;
            END IF;
            -- MATERIALIZED: the statement runs once, however often the
            -- outer query names its column (a flattened subquery ran a
            -- STABLE function three times).
            FOR r IN EXECUTE format(
                'WITH s(x) AS MATERIALIZED (%s) SELECT (s.x)::text AS t, CASE WHEN jsonb_typeof(to_jsonb(s.x)) = ''object'' THEN to_jsonb(s.x) ->> ''status'' END AS st FROM s',
                v_sql) USING p_params
            LOOP
                v_rows := array_append(v_rows, r.t);
                v_bytes := v_bytes + coalesce(octet_length(r.t), 0);
                IF v_bytes > coalesce(p_max_result_bytes, 16777216) THEN
                    RAISE EXCEPTION USING ERRCODE = 'GV092', MESSAGE = 'result too large';
                END IF;
                IF (p_mode = 'verify' AND (r.st IS NULL OR NOT r.st = ANY (c.expect_status)))
                   OR (p_mode = 'apply' AND r.st IS NOT NULL AND NOT r.st = ANY (c.expect_status)) THEN
                    v_ok := false;
                    v_word := CASE WHEN r.st ~ '^[a-z_]{1,32}$' THEN r.st END;
                END IF;
            END LOOP;
        END LOOP;
        IF p_mode = 'verify' THEN
            RAISE EXCEPTION USING ERRCODE = 'GV090', MESSAGE = 'end of the read-only checks';
        END IF;
        IF NOT v_ok THEN
            RAISE EXCEPTION USING ERRCODE = 'GV091', MESSAGE = 'unexpected status';
        END IF;
    EXCEPTION
        WHEN SQLSTATE 'GV090' THEN
            IF NOT v_ok THEN
                v_class := 'verification_failed';
            END IF;
        WHEN SQLSTATE 'GV091' THEN
            v_class := 'unexpected_status';
            v_rows := ARRAY[]::text[];
        WHEN SQLSTATE 'GV092' THEN
            v_class := 'result_too_large';
            v_rows := ARRAY[]::text[];
        WHEN OTHERS THEN
            v_class := SQLSTATE;
            v_rows := ARRAY[]::text[];
    END;
    IF v_word IS NOT NULL THEN
        v_extra := jsonb_build_object('answered_status', v_word);
    END IF;
    v_extra := v_extra || jsonb_build_object('row_count', cardinality(v_rows));
    v_status := CASE WHEN v_class IS NOT NULL THEN 'failed' WHEN p_mode = 'apply' THEN 'applied' ELSE 'verified' END;
    FOR v_i IN 1 .. cardinality(v_rows) LOOP
        kind := 'row';
        value := v_rows[v_i];
        RETURN NEXT;
    END LOOP;
    kind := 'run';
    value := public.fn_dot_iu_record(p_command, p_mode, v_status, p_actor, v_digest, p_key,
        public.fn_dot_iu_evidence(p_mode, p_client, cardinality(c.statements), v_class, NULL, v_started, v_extra),
        v_class, NULL, NULL);
    RETURN NEXT;
END
$$;

-- A refusal the daemon found before dispatching. Writes a refused row and
-- nothing else; the classes are the daemon's.
CREATE FUNCTION public.fn_dot_iu_refuse(
    p_mode text, p_command text, p_params jsonb, p_key text, p_actor text, p_class text, p_client jsonb
) RETURNS TABLE (kind text, value text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    c public.dot_iu_command_catalog%ROWTYPE;
BEGIN
    PERFORM public.fn_dot_iu_check_call(p_mode, p_key, p_actor);
    IF p_class IS NULL OR p_class NOT IN ('bad_params', 'unsafe_plan', 'not_allowed', 'approval_missing',
        'approval_expired', 'rejected', 'cancelled', 'kill_switch', 'log_exposure') THEN
        RAISE EXCEPTION USING ERRCODE = 'GV006', MESSAGE = 'not a refusal class';
    END IF;
    c := public.fn_dot_iu_entry_command(p_command);
    kind := 'run';
    value := public.fn_dot_iu_record(p_command, p_mode, 'refused', p_actor,
        public.fn_dot_iu_params_digest(p_command, p_params), p_key,
        public.fn_dot_iu_evidence(p_mode, p_client, cardinality(c.statements), p_class, NULL, clock_timestamp(), NULL),
        p_class, NULL, NULL);
    RETURN NEXT;
END
$$;

-- A failure the daemon saw around a dispatch (timeout, a lost target).
-- Under the key's lock: an apply that committed after all is reported as
-- its original run (settlement); otherwise a failed row is written.
CREATE FUNCTION public.fn_dot_iu_fail(
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
    SELECT run_id, run_status, params_digest INTO v_prior FROM public.dot_iu_command_run
     WHERE idempotency_key = p_key AND run_mode = p_mode AND run_status IN ('planned', 'applied', 'verified')
       AND params_digest = v_digest;
    kind := 'run';
    IF FOUND THEN
        value := public.fn_dot_iu_run_row(v_prior.run_id, v_prior.run_status, NULL, NULL, NULL, true, v_digest);
    ELSE
        value := public.fn_dot_iu_record(p_command, p_mode, CASE WHEN p_mode = 'plan' THEN 'refused' ELSE 'failed' END,
            p_actor, v_digest, p_key,
            public.fn_dot_iu_evidence(p_mode, p_client, cardinality(c.statements), p_class, NULL, clock_timestamp(), NULL),
            p_class, NULL, NULL);
    END IF;
    RETURN NEXT;
END
$$;

-- Whether a command's stored statements resolve with the argument types
-- they use (each SELECT is prepared, never run) and its targets exist.
CREATE FUNCTION public.fn_dot_iu_command_resolves(p_statements text[], p_kinds text[], p_targets text[])
RETURNS boolean
LANGUAGE plpgsql SET search_path = public, pg_temp AS $$
DECLARE
    v_i int;
BEGIN
    FOR v_i IN 1 .. cardinality(p_statements) LOOP
        IF p_kinds[v_i] = 'select' THEN
            BEGIN
                EXECUTE format('PREPARE govsql_resolve(jsonb) AS %s', p_statements[v_i]);
                DEALLOCATE govsql_resolve;
            EXCEPTION WHEN undefined_function OR undefined_table OR wrong_object_type THEN
                RETURN false;
            END;
        END IF;
    END LOOP;
    RETURN NOT EXISTS (SELECT 1 FROM unnest(p_targets) AS t
        WHERE NOT EXISTS (SELECT 1 FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace AND p.proname = t));
END
$$;

-- Run by govsql migrate after the seed: every stored statement must
-- resolve with the argument types it uses (checked by preparing it); a
-- command that does not is marked unavailable. Grants follow: the owner
-- may execute the governed functions, nobody else may. Returns the
-- commands that are unavailable (govsql migrate fails on them unless
-- --allow-missing; either way they are refused with target_missing).
CREATE FUNCTION public.fn_dot_iu_catalog_resolve(p_runtime_role text)
RETURNS text[]
LANGUAGE plpgsql SET search_path = public, pg_temp AS $$
DECLARE
    c         record;
    v_missing text[] := ARRAY[]::text[];
    v_bad     boolean;
    f         record;
BEGIN
    FOR c IN SELECT * FROM public.dot_iu_command_catalog WHERE NOT retired ORDER BY command_name LOOP
        v_bad := NOT public.fn_dot_iu_command_resolves(c.statements, c.statement_kinds, c.target_functions);
        IF v_bad THEN
            v_missing := array_append(v_missing, c.command_name::text);
        END IF;
        UPDATE public.dot_iu_command_catalog SET unavailable = v_bad
         WHERE command_name = c.command_name AND unavailable IS DISTINCT FROM v_bad;
    END LOOP;
    -- Every governed function: executable by the owner only.
    FOR f IN SELECT p.oid::regprocedure AS sig FROM pg_proc p
              WHERE p.pronamespace = 'public'::regnamespace
                AND p.proname IN (SELECT DISTINCT unnest(target_functions) FROM public.dot_iu_command_catalog) LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f.sig);
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM %I', f.sig, p_runtime_role);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO govsql_owner', f.sig);
    END LOOP;
    RETURN v_missing;
END
$$;

-- The ledger for `govsql log`, newest first, as one JSON object per row
-- (kind 'entry'): structural facts only, as the ledger holds no value.
-- Filters (all optional): command, status, mode, actor, since (a
-- timestamptz), target, no_verify; at most 1000 rows.
CREATE FUNCTION public.fn_dot_iu_ledger(p_filter jsonb, p_limit int) RETURNS TABLE (kind text, value text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    f jsonb := coalesce(p_filter, '{}'::jsonb);
BEGIN
    RETURN QUERY
    SELECT 'entry'::text, jsonb_build_object(
        'run_id', r.run_id,
        'at', to_char(r.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS"Z"'),
        'at_unix', floor(extract(epoch FROM r.created_at))::bigint,
        'command', r.command_name,
        'mode', r.run_mode,
        'status', r.run_status,
        'actor', r.actor,
        'error_class', r.evidence ->> 'error_class',
        'duration_ms', (r.evidence ->> 'duration_ms')::bigint,
        'job_id', r.evidence ->> 'job_id',
        'target', r.evidence ->> 'target')::text
      FROM public.dot_iu_command_run r
     WHERE (f ->> 'command' IS NULL OR r.command_name = f ->> 'command')
       AND (f ->> 'status' IS NULL OR r.run_status = f ->> 'status')
       AND (f ->> 'mode' IS NULL OR r.run_mode = f ->> 'mode')
       AND (f ->> 'actor' IS NULL OR r.actor = f ->> 'actor')
       AND (f ->> 'target' IS NULL OR r.evidence ->> 'target' = f ->> 'target')
       AND (f ->> 'since' IS NULL OR r.created_at >= (f ->> 'since')::timestamptz)
       AND NOT (coalesce((f ->> 'no_verify')::boolean, false) AND r.run_mode = 'verify')
     ORDER BY r.run_id DESC
     LIMIT least(greatest(coalesce(p_limit, 50), 1), 1000);
END
$$;

-- What the runtime may know about its own standing, for `catalog check`
-- and `self-test` (rows of (kind, value)): the catalog digest, commands
-- whose targets do not resolve, logging settings that could expose a
-- value, and privileges the calling role should not have.
CREATE FUNCTION public.fn_dot_iu_status() RETURNS TABLE (kind text, value text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    v_role name := session_user;
BEGIN
    RETURN QUERY SELECT 'digest'::text, public.fn_dot_iu_catalog_digest();
    -- Checked live: a function dropped after migrate shows here too.
    RETURN QUERY SELECT 'unavailable'::text, c.command_name::text FROM public.dot_iu_command_catalog c
                  WHERE NOT c.retired
                    AND (c.unavailable OR NOT public.fn_dot_iu_command_resolves(c.statements, c.statement_kinds, c.target_functions))
                  ORDER BY 2;
    RETURN QUERY SELECT 'log_exposure'::text, e FROM unnest(public.fn_dot_iu_log_exposure()) AS e;
    RETURN QUERY SELECT 'privilege'::text, x FROM (
        SELECT 'is a superuser' AS x FROM pg_roles WHERE rolname = v_role AND rolsuper
        UNION ALL SELECT 'has CREATEROLE' FROM pg_roles WHERE rolname = v_role AND rolcreaterole
        UNION ALL SELECT 'has CREATEDB' FROM pg_roles WHERE rolname = v_role AND rolcreatedb
        UNION ALL SELECT 'has BYPASSRLS' FROM pg_roles WHERE rolname = v_role AND rolbypassrls
        UNION ALL SELECT 'owns ' || cl.relname FROM pg_class cl
                  WHERE cl.relnamespace = 'public'::regnamespace AND pg_get_userbyid(cl.relowner) = v_role
        UNION ALL SELECT 'owns function ' || p.proname FROM pg_proc p
                  WHERE p.pronamespace = 'public'::regnamespace AND pg_get_userbyid(p.proowner) = v_role
        UNION ALL SELECT 'has privileges on table ' || cl.relname FROM pg_class cl
                  WHERE cl.relnamespace = 'public'::regnamespace AND cl.relkind IN ('r', 'v', 'm', 'p')
                    AND (has_table_privilege(v_role, cl.oid, 'SELECT') OR has_table_privilege(v_role, cl.oid, 'INSERT')
                         OR has_table_privilege(v_role, cl.oid, 'UPDATE') OR has_table_privilege(v_role, cl.oid, 'DELETE'))
        UNION ALL SELECT 'can execute ' || p.oid::regprocedure::text FROM pg_proc p
                  WHERE p.pronamespace = 'public'::regnamespace
                    AND p.proname NOT IN ('fn_dot_iu_dispatch', 'fn_dot_iu_refuse', 'fn_dot_iu_fail', 'fn_dot_iu_status', 'fn_dot_iu_ledger')
                    AND has_function_privilege(v_role, p.oid, 'EXECUTE')
    ) AS problems ORDER BY 2;
END
$$;

-- The owner's rights: read the catalog, the ledger and the secret, call
-- the substrate functions its entries use.
GRANT SELECT ON public.dot_iu_command_catalog, public.dot_iu_catalog_state, public.dot_iu_command_run,
    public.dot_iu_secret, public.dot_config TO govsql_owner;
GRANT EXECUTE ON FUNCTION public.fn_dot_iu_command_log(text, text, text, text, text, text, jsonb),
    public.fn_dot_iu_gate_assert(text[]), public.fn_dot_iu_closed_gates(text[]),
    public.fn_dot_iu_catalog_digest(), public.fn_dot_iu_gate_is_open(text) TO govsql_owner;
REVOKE ALL ON TABLE public.dot_iu_secret FROM PUBLIC;
REVOKE ALL ON FUNCTION public.fn_dot_iu_params_digest(text, jsonb), public.fn_dot_iu_params_problem(jsonb, jsonb),
    public.fn_dot_iu_log_exposure(), public.fn_dot_iu_run_row(bigint, text, text, text[], text[], boolean, text),
    public.fn_dot_iu_evidence(text, jsonb, int, text, text[], timestamptz, jsonb),
    public.fn_dot_iu_record(text, text, text, text, text, text, jsonb, text, text[], text[]),
    public.fn_dot_iu_check_call(text, text, text), public.fn_dot_iu_entry_command(text),
    public.fn_dot_iu_dispatch(text, text, jsonb, text, text, text, boolean, bigint, jsonb),
    public.fn_dot_iu_refuse(text, text, jsonb, text, text, text, jsonb),
    public.fn_dot_iu_fail(text, text, jsonb, text, text, text, jsonb),
    public.fn_dot_iu_catalog_resolve(text), public.fn_dot_iu_status(),
    public.fn_dot_iu_ledger(jsonb, int),
    public.fn_dot_iu_command_resolves(text[], text[], text[]) FROM PUBLIC;
ALTER FUNCTION public.fn_dot_iu_params_digest(text, jsonb) OWNER TO govsql_owner;
ALTER FUNCTION public.fn_dot_iu_params_problem(jsonb, jsonb) OWNER TO govsql_owner;
ALTER FUNCTION public.fn_dot_iu_log_exposure() OWNER TO govsql_owner;
ALTER FUNCTION public.fn_dot_iu_run_row(bigint, text, text, text[], text[], boolean, text) OWNER TO govsql_owner;
ALTER FUNCTION public.fn_dot_iu_evidence(text, jsonb, int, text, text[], timestamptz, jsonb) OWNER TO govsql_owner;
ALTER FUNCTION public.fn_dot_iu_record(text, text, text, text, text, text, jsonb, text, text[], text[]) OWNER TO govsql_owner;
ALTER FUNCTION public.fn_dot_iu_check_call(text, text, text) OWNER TO govsql_owner;
ALTER FUNCTION public.fn_dot_iu_entry_command(text) OWNER TO govsql_owner;
ALTER FUNCTION public.fn_dot_iu_dispatch(text, text, jsonb, text, text, text, boolean, bigint, jsonb) OWNER TO govsql_owner;
ALTER FUNCTION public.fn_dot_iu_refuse(text, text, jsonb, text, text, text, jsonb) OWNER TO govsql_owner;
ALTER FUNCTION public.fn_dot_iu_fail(text, text, jsonb, text, text, text, jsonb) OWNER TO govsql_owner;
ALTER FUNCTION public.fn_dot_iu_status() OWNER TO govsql_owner;
ALTER FUNCTION public.fn_dot_iu_ledger(jsonb, int) OWNER TO govsql_owner;
ALTER FUNCTION public.fn_dot_iu_command_resolves(text[], text[], text[]) OWNER TO govsql_owner;

-- The runtime role: the three entries and nothing else.
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM :"runtime_role";
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA public FROM :"runtime_role";
GRANT EXECUTE ON FUNCTION public.fn_dot_iu_dispatch(text, text, jsonb, text, text, text, boolean, bigint, jsonb),
    public.fn_dot_iu_refuse(text, text, jsonb, text, text, text, jsonb),
    public.fn_dot_iu_fail(text, text, jsonb, text, text, text, jsonb),
    public.fn_dot_iu_status(), public.fn_dot_iu_ledger(jsonb, int) TO :"runtime_role";

-- No statement text, bind parameter or error statement of the runtime
-- role's sessions reaches the server log (a role setting wins over
-- postgresql.conf); apply refuses (log_exposure) if one is overridden.
-- Role settings are cluster-wide: set only when missing, and retried when
-- another database's migration updates them at the same moment.
SELECT set_config('govsql.runtime_role', :'runtime_role', true) AS govsql_ignored \gset
DO $$
DECLARE
    v_role    text := current_setting('govsql.runtime_role');
    v_wanted  text[] := ARRAY['log_statement=none', 'log_min_error_statement=panic',
        'log_min_duration_statement=-1', 'log_min_duration_sample=-1',
        'log_parameter_max_length=0', 'log_parameter_max_length_on_error=0'];
    v_setting text;
    v_try     int;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole
               WHERE r.rolname = v_role AND s.setdatabase = 0 AND s.setconfig @> v_wanted) THEN
        RETURN;
    END IF;
    FOREACH v_setting IN ARRAY v_wanted LOOP
        FOR v_try IN 1 .. 50 LOOP
            BEGIN
                EXECUTE format('ALTER ROLE %I SET %s = %L', v_role,
                    split_part(v_setting, '=', 1), split_part(v_setting, '=', 2));
                EXIT;
            EXCEPTION WHEN internal_error OR serialization_failure OR unique_violation THEN
                IF v_try = 50 THEN
                    RAISE;
                END IF;
                PERFORM pg_sleep(0.02 * v_try);
            END;
        END LOOP;
    END LOOP;
END
$$;
