-- Idempotency keys are their actor's, a job's failure row is written
-- once, no notification reaches a job's output, and `log` is served by an
-- index.
--
-- Keys: a key used up (planned, applied, verified) by one actor is refused
-- `idempotency_conflict` to every other actor, whatever the params, so
-- replay versus conflict tells another actor nothing about a run's params
-- (before, another apply user replaying your key learned whether a guessed
-- value matched). The rule lives in fn_dot_iu_key_prior, which the three
-- entries call under the key's lock; exactly-once is unchanged (the unique
-- index on (idempotency_key, run_mode) still holds one success per key).
--
-- Notifications: the dispatcher ends an apply's statements with UNLISTEN
-- *, so a governed function that LISTENed and NOTIFYed gets nothing
-- delivered amid the job's output (psql printed it there, and a first run
-- was reported as "already applied").
--
-- A timed-out job: the fail entry settles it only once no backend of the
-- job is left (GV010 otherwise, and the job stays unsettled): a backend
-- frozen with its dispatch still unread could take the key's lock after
-- the failure row and commit.
--
-- Failure rows: a timed-out job whose failure row could not be confirmed
-- (the fail entry's own call was cut off: it may have committed) owes that
-- row, and the daemon writes it again once the target answers. So the fail
-- entry returns the row this job (the job_id of its client facts) already
-- has under the key, as a replay, before writing a new one.

-- The success under a key in a mode, if any: replay when it is this
-- actor's with these params, conflict otherwise. Called under the key's
-- advisory lock.
CREATE FUNCTION public.fn_dot_iu_key_prior(p_mode text, p_key text, p_actor text, p_digest text)
RETURNS TABLE (run_id bigint, run_status text, replay boolean)
LANGUAGE sql STABLE SET search_path = public, pg_temp AS $$
    SELECT r.run_id, r.run_status, r.actor = p_actor AND r.params_digest = p_digest
      FROM public.dot_iu_command_run r
     WHERE r.idempotency_key = p_key AND r.run_mode = p_mode
       AND r.run_status IN ('planned', 'applied', 'verified')
$$;
REVOKE ALL ON FUNCTION public.fn_dot_iu_key_prior(text, text, text, text) FROM PUBLIC;
ALTER FUNCTION public.fn_dot_iu_key_prior(text, text, text, text) OWNER TO govsql_owner;

-- The dispatcher (005's, with the key rule above; a conflict is found
-- before the reasons, so the reasons no longer look for one).
CREATE OR REPLACE FUNCTION public.fn_dot_iu_dispatch(
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

    -- Idempotency: one run per (key, mode), the key its actor's; an
    -- orphaned transaction of an earlier attempt is waited for here.
    PERFORM pg_advisory_xact_lock(hashtextextended('govsql:' || p_mode || ':' || p_key, 0));
    SELECT * INTO v_prior FROM public.fn_dot_iu_key_prior(p_mode, p_key, p_actor, v_digest);
    IF FOUND THEN
        kind := 'run';
        IF v_prior.replay THEN
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
        -- A governed function that LISTENed would have a notification
        -- delivered amid the job's output after the commit: none is.
        UNLISTEN *;
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

-- The refuse entry (007's): settles by key first, its actor's key only;
-- it also records `unknown_command` (a job whose command left the
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

-- The fail entry (005's): settles by key first (its actor's key only),
-- then returns this job's own failure row if it has one.
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

-- `govsql log` (005's, same answer): the query is built from the filters
-- given, so a non-admin's actor filter is a plain equality the index below
-- serves (the catch-all `IS NULL OR` form scanned the whole ledger: 30
-- `log` calls of one user on a 1 M-row ledger slowed everyone's jobs).
CREATE INDEX IF NOT EXISTS dot_iu_command_run_actor_idx ON public.dot_iu_command_run (actor, run_id DESC);

CREATE OR REPLACE FUNCTION public.fn_dot_iu_ledger(p_filter jsonb, p_limit int) RETURNS TABLE (kind text, value text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    f jsonb := coalesce(p_filter, '{}'::jsonb);
    v_where text := '';
BEGIN
    IF f ->> 'command' IS NOT NULL THEN v_where := v_where || ' AND r.command_name = $1'; END IF;
    IF f ->> 'status' IS NOT NULL THEN v_where := v_where || ' AND r.run_status = $2'; END IF;
    IF f ->> 'mode' IS NOT NULL THEN v_where := v_where || ' AND r.run_mode = $3'; END IF;
    IF f ->> 'actor' IS NOT NULL THEN v_where := v_where || ' AND r.actor = $4'; END IF;
    IF f ->> 'target' IS NOT NULL THEN v_where := v_where || ' AND r.evidence ->> ''target'' = $5'; END IF;
    IF f ->> 'since' IS NOT NULL THEN v_where := v_where || ' AND r.created_at >= $6'; END IF;
    IF coalesce((f ->> 'no_verify')::boolean, false) THEN v_where := v_where || ' AND r.run_mode <> ''verify'''; END IF;
    RETURN QUERY EXECUTE
        'SELECT ''entry''::text, jsonb_build_object(
            ''run_id'', r.run_id,
            ''at'', to_char(r.created_at AT TIME ZONE ''UTC'', ''YYYY-MM-DD HH24:MI:SS"Z"''),
            ''at_unix'', floor(extract(epoch FROM r.created_at))::bigint,
            ''command'', r.command_name,
            ''mode'', r.run_mode,
            ''status'', r.run_status,
            ''actor'', r.actor,
            ''error_class'', r.evidence ->> ''error_class'',
            ''duration_ms'', (r.evidence ->> ''duration_ms'')::bigint,
            ''job_id'', r.evidence ->> ''job_id'',
            ''target'', r.evidence ->> ''target'')::text
          FROM public.dot_iu_command_run r WHERE true' || v_where ||
        ' ORDER BY r.run_id DESC LIMIT $7'
        USING f ->> 'command', f ->> 'status', f ->> 'mode', f ->> 'actor', f ->> 'target',
              (f ->> 'since')::timestamptz, least(greatest(coalesce(p_limit, 50), 1), 1000);
END
$$;
