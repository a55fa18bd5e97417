-- The dispatcher: plan, apply or verify one governed command in one
-- transaction with its ledger row. The runtime role calls
-- fn_dot_iu_dispatch; the two helpers check what every entry checks.
--
-- Each entry returns rows (kind, value): 'row' rows carry a command's
-- result values as text, then one 'run' row carries a JSON object: run_id,
-- status, class, closed_gates, reasons, replayed, params_digest.
--
-- A repeatable file (CREATE OR REPLACE only): see src/migrate.rs.

-- Shared entry checks: mode, actor and key are runtime-owned words.
CREATE OR REPLACE FUNCTION public.fn_dot_iu_check_call(p_mode text, p_key text, p_actor text) RETURNS void
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
CREATE OR REPLACE FUNCTION public.fn_dot_iu_entry_command(p_command text) RETURNS public.dot_iu_command_catalog
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

-- The backend's table counters, for the user tables with a count:
-- {"schema.table": [inserted, updated, deleted]} (NULL when counting is
-- off: track_counts). They are PostgreSQL's transaction statistics: every
-- row inserted, updated or deleted, whoever's function did it (SECURITY
-- DEFINER included), and rows of a subtransaction that was rolled back
-- too (a count of rows touched, never fewer than those that commit);
-- TRUNCATE changes no count. A busy backend keeps them pending for up to
-- a second across its transactions, so the dispatcher counts before and
-- after the statements and takes the difference.
--
-- pg_class is read directly (its user relations, three counters each):
-- the pg_stat_xact_user_tables view cost about 0.3 ms more per call.
CREATE OR REPLACE FUNCTION public.fn_dot_iu_rows_touched() RETURNS jsonb
LANGUAGE plpgsql VOLATILE SET search_path = public, pg_temp AS $$
BEGIN
    IF current_setting('track_counts') <> 'on' THEN
        RETURN NULL;
    END IF;
    RETURN coalesce((
        SELECT jsonb_object_agg(c.relnamespace::regnamespace::text || '.' || c.relname,
                                jsonb_build_array(x.ti, x.tu, x.td))
          FROM pg_class c,
               LATERAL (SELECT pg_stat_get_xact_tuples_inserted(c.oid) AS ti,
                               pg_stat_get_xact_tuples_updated(c.oid) AS tu,
                               pg_stat_get_xact_tuples_deleted(c.oid) AS td) AS x
         WHERE c.relkind IN ('r', 'p', 'm')
           AND c.relnamespace <> 'pg_catalog'::regnamespace
           AND c.relnamespace <> 'information_schema'::regnamespace
           AND x.ti + x.tu + x.td > 0
    ), '{}'::jsonb);
END
$$;

-- What changed between two counts of fn_dot_iu_rows_touched: the rows per
-- table ({"inserted", "updated", "deleted"}, the 50 largest) and their sum.
CREATE OR REPLACE FUNCTION public.fn_dot_iu_rows_changed(p_before jsonb, p_after jsonb)
RETURNS TABLE (per_table jsonb, total bigint)
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN QUERY
    WITH d AS (
        SELECT a.key AS tbl,
               (a.value ->> 0)::bigint - coalesce((p_before -> a.key ->> 0)::bigint, 0) AS ins,
               (a.value ->> 1)::bigint - coalesce((p_before -> a.key ->> 1)::bigint, 0) AS upd,
               (a.value ->> 2)::bigint - coalesce((p_before -> a.key ->> 2)::bigint, 0) AS del
          FROM jsonb_each(coalesce(p_after, '{}'::jsonb)) AS a
    ), nz AS (
        SELECT *, ins + upd + del AS n FROM d WHERE ins + upd + del > 0
    )
    SELECT coalesce((SELECT jsonb_object_agg(t.tbl, jsonb_build_object('inserted', t.ins, 'updated', t.upd, 'deleted', t.del))
                       FROM (SELECT * FROM nz ORDER BY n DESC, tbl LIMIT 50) AS t), '{}'::jsonb),
           coalesce((SELECT sum(n) FROM nz), 0)::bigint;
END
$$;

-- The live freeze windows that cover a command at a time: by its name, by
-- its category, or every command (both NULL). PL/pgSQL, so its plan is
-- kept for the session (a SQL function with a SET clause is planned again
-- in every transaction: about 0.07 ms per call, two calls per apply).
CREATE OR REPLACE FUNCTION public.fn_dot_iu_freezes(p_command text, p_category text, p_at timestamptz)
RETURNS bigint[]
LANGUAGE plpgsql STABLE SET search_path = public, pg_temp AS $$
BEGIN
    RETURN (SELECT coalesce(array_agg(f.freeze_id ORDER BY f.freeze_id), ARRAY[]::bigint[])
              FROM public.dot_iu_freeze f
             WHERE f.removed_at IS NULL AND f.starts_at <= p_at AND p_at < f.ends_at
               AND (f.command_name = p_command OR f.category = p_category
                    OR (f.command_name IS NULL AND f.category IS NULL)));
END
$$;

-- What a plan covers, which its digest binds: the target (the daemon's
-- name for it), the command, the keyed params digest, the catalog digest,
-- the md5 of each target function's definition (every overload), the
-- gates an apply needs and the row cap, and, for a plan the daemon pinned
-- for one job, that job's id (so two jobs with the same params are two
-- plans, each approved once). Never a value.
CREATE OR REPLACE FUNCTION public.fn_dot_iu_plan_facts(
    c public.dot_iu_command_catalog, p_target text, p_params_digest text, p_job text
) RETURNS jsonb
LANGUAGE plpgsql STABLE SET search_path = public, pg_temp AS $$
BEGIN
    RETURN CASE WHEN p_job IS NOT NULL THEN jsonb_build_object('job_id', p_job) ELSE '{}'::jsonb END
    || jsonb_build_object(
        'target', coalesce(p_target, ''),
        'command', c.command_name,
        'params_digest', p_params_digest,
        'catalog_digest', coalesce((SELECT digest FROM public.dot_iu_catalog_state), ''),
        'functions', coalesce((
            SELECT jsonb_object_agg(p.oid::regprocedure::text, md5(pg_get_functiondef(p.oid)))
              FROM pg_proc p
             WHERE p.pronamespace = 'public'::regnamespace AND p.proname = ANY (c.target_functions)
               AND p.prokind = 'f'), '{}'::jsonb),
        'gates', to_jsonb(c.required_gates),
        'max_rows', c.max_rows);
END
$$;

-- A plan's digest: sha256 of its facts' canonical text.
CREATE OR REPLACE FUNCTION public.fn_dot_iu_plan_digest(p_facts jsonb) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT encode(sha256(convert_to(p_facts::text, 'UTF8')), 'hex')
$$;

-- What moved between a pinned plan's facts and now: each part by name
-- (a function by its signature), never a value.
CREATE OR REPLACE FUNCTION public.fn_dot_iu_plan_moved(p_then jsonb, p_now jsonb) RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(array_agg(m ORDER BY m), ARRAY[]::text[]) FROM (
        SELECT k AS m FROM unnest(ARRAY['job_id', 'target', 'command', 'params_digest', 'catalog_digest', 'gates', 'max_rows']) AS k
         WHERE p_then -> k IS DISTINCT FROM p_now -> k
        UNION ALL
        SELECT 'function ' || f FROM (
            SELECT jsonb_object_keys(coalesce(p_then -> 'functions', '{}'::jsonb)) AS f
            UNION SELECT jsonb_object_keys(coalesce(p_now -> 'functions', '{}'::jsonb))
        ) AS fs
         WHERE p_then -> 'functions' -> f IS DISTINCT FROM p_now -> 'functions' -> f
    ) AS moved
$$;

-- The pin entry: what an apply of this command with these params would be
-- pinned to now, without running or recording anything (the daemon pins
-- a job that needs approval when it is submitted, so its approvers
-- approve that plan). One 'pin' row: {"plan_digest", "plan_covers"}, or
-- {"class": "bad_params"}.
CREATE OR REPLACE FUNCTION public.fn_dot_iu_pin(p_command text, p_params jsonb, p_client jsonb)
RETURNS TABLE (kind text, value text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    c       public.dot_iu_command_catalog%ROWTYPE;
    v_facts jsonb;
BEGIN
    c := public.fn_dot_iu_entry_command(p_command);
    kind := 'pin';
    IF public.fn_dot_iu_params_problem(c.param_specs, p_params) IS NOT NULL THEN
        value := jsonb_build_object('class', 'bad_params')::text;
    ELSE
        v_facts := public.fn_dot_iu_plan_facts(c, p_client ->> 'target',
                                               public.fn_dot_iu_params_digest(p_command, p_params),
                                               p_client ->> 'job_id');
        value := jsonb_build_object('plan_digest', public.fn_dot_iu_plan_digest(v_facts),
                                    'plan_covers', v_facts)::text;
    END IF;
    RETURN NEXT;
END
$$;

-- The distinct approvers the daemon asserts for a job (its approvals
-- list, and the approved_by of a job queued by an earlier release), the
-- submitter never among them.
CREATE OR REPLACE FUNCTION public.fn_dot_iu_approvers(p_client jsonb, p_actor text) RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(array_agg(DISTINCT b ORDER BY b), ARRAY[]::text[]) FROM (
        SELECT a ->> 'by' AS b FROM jsonb_array_elements(
            CASE WHEN jsonb_typeof(p_client -> 'approvals') = 'array' THEN p_client -> 'approvals' ELSE '[]'::jsonb END) AS a
        UNION ALL
        SELECT p_client ->> 'approved_by'
         WHERE jsonb_typeof(p_client -> 'approvals') IS DISTINCT FROM 'array'
    ) AS x
    WHERE b IS NOT NULL AND b <> '' AND b <> p_actor
$$;

-- The dispatcher. Under the key's advisory lock, the key rule
-- (fn_dot_iu_key_prior) comes first: a replay or a conflict is found
-- before the reasons are.
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
    v_touched  jsonb;
    v_by_table jsonb;
    v_changed  bigint;
    v_frozen   bigint[] := ARRAY[]::bigint[];
    v_facts    jsonb;
    v_plan     text;
    v_pinned   text := CASE WHEN jsonb_typeof(p_client -> 'plan_digest') = 'string' THEN p_client ->> 'plan_digest' END;
    v_then     jsonb;
    v_used     bigint;
    v_approvers text[];
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

    -- A command that needs approval: as many distinct approvers as it
    -- asks, none the submitter (the daemon asserts who approved).
    IF p_mode = 'apply' AND c.requires_approval THEN
        v_approvers := public.fn_dot_iu_approvers(p_client, p_actor);
        IF cardinality(v_approvers) < c.approvals_required THEN
            v_class := 'approval_missing';
            v_reasons := ARRAY[format('%s of %s approvals', cardinality(v_approvers), c.approvals_required)];
        END IF;
    END IF;

    -- A pinned plan (an approved apply): what it covers must be what
    -- would run now, and its approval is used once. The facts it was
    -- pinned with come from the daemon (a job pinned at submit) or from
    -- the planned row that recorded them (`apply --plan`).
    IF p_mode = 'plan' THEN
        v_facts := public.fn_dot_iu_plan_facts(c, p_client ->> 'target', v_digest, NULL);
        v_plan := public.fn_dot_iu_plan_digest(v_facts);
    END IF;
    IF p_mode = 'apply' AND v_pinned IS NOT NULL AND v_class IS NULL THEN
        PERFORM pg_advisory_xact_lock(hashtextextended('govsql:plan:' || v_pinned, 0));
        IF jsonb_typeof(p_client -> 'plan_covers') = 'object'
           AND public.fn_dot_iu_plan_digest(p_client -> 'plan_covers') = v_pinned THEN
            v_then := p_client -> 'plan_covers';
        ELSE
            SELECT l.evidence -> 'plan_covers' INTO v_then FROM public.dot_iu_command_run l
             WHERE l.evidence ? 'plan_digest' AND l.evidence ->> 'plan_digest' = v_pinned AND l.run_mode = 'plan' AND l.run_status = 'planned'
             ORDER BY l.run_id LIMIT 1;
        END IF;
        -- A plan pinned for one job binds that job: another job's is drift.
        v_facts := public.fn_dot_iu_plan_facts(c, p_client ->> 'target', v_digest,
                                               CASE WHEN v_then ? 'job_id' THEN coalesce(p_client ->> 'job_id', '') END);
        v_plan := public.fn_dot_iu_plan_digest(v_facts);
        SELECT l.run_id INTO v_used FROM public.dot_iu_command_run l
         WHERE l.evidence ? 'plan_digest' AND l.evidence ->> 'plan_digest' = v_pinned AND l.run_mode = 'apply' AND l.run_status = 'applied'
         ORDER BY l.run_id LIMIT 1;
        IF v_then IS NULL THEN
            v_class := 'plan_drift';
            v_reasons := ARRAY['no plan has this digest'];
        ELSIF v_plan IS DISTINCT FROM v_pinned THEN
            v_class := 'plan_drift';
            v_reasons := public.fn_dot_iu_plan_moved(v_then, v_facts);
        ELSIF v_used IS NOT NULL THEN
            v_class := 'approval_missing';
            v_reasons := ARRAY['the plan was applied by run ' || v_used];
        END IF;
        IF v_class IS NOT NULL THEN
            v_extra := jsonb_build_object('plan_digest', v_pinned, 'plan_moved', to_jsonb(v_reasons));
        END IF;
    END IF;
    -- Too few approvers, or a pinned plan that moved or was used: refused.
    IF v_class IS NOT NULL THEN
        kind := 'run';
        value := public.fn_dot_iu_record(p_command, p_mode, 'refused', p_actor, v_digest, p_key,
            public.fn_dot_iu_evidence(p_mode, p_client, cardinality(c.statements), v_class, NULL, v_started, v_extra),
            v_class, NULL, v_reasons);
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
    IF p_mode <> 'verify' THEN
        v_frozen := public.fn_dot_iu_freezes(c.command_name, c.category, clock_timestamp());
        IF cardinality(v_frozen) > 0 THEN
            v_reasons := array_append(v_reasons, 'frozen');
        END IF;
    END IF;

    IF p_mode = 'plan' THEN
        kind := 'run';
        value := (public.fn_dot_iu_record(p_command, p_mode, 'planned', p_actor, v_digest, p_key,
            public.fn_dot_iu_evidence(p_mode, p_client, cardinality(c.statements), NULL, v_closed, v_started,
                jsonb_build_object('reasons', to_jsonb(v_reasons), 'max_rows', c.max_rows,
                                   'plan_digest', v_plan, 'plan_covers', v_facts)
                || CASE WHEN cardinality(v_frozen) > 0 THEN jsonb_build_object('freeze_ids', to_jsonb(v_frozen)) ELSE '{}'::jsonb END),
            NULL, v_closed, v_reasons)::jsonb || jsonb_build_object('plan_digest', v_plan))::text;
        RETURN NEXT;
        RETURN;
    END IF;

    -- apply refuses on any reason; verify only on what makes it unsafe to run.
    IF p_mode = 'apply' AND cardinality(v_reasons) > 0 THEN
        v_class := CASE
            WHEN 'target_missing' = ANY (v_reasons) THEN 'target_missing'
            WHEN 'catalog_drift' = ANY (v_reasons) THEN 'catalog_drift'
            WHEN 'gate_closed' = ANY (v_reasons) THEN 'gate_closed'
            WHEN 'frozen' = ANY (v_reasons) THEN 'frozen'
            ELSE v_reasons[1] END;
    ELSIF p_mode = 'verify' AND 'target_missing' = ANY (v_reasons) THEN
        v_class := 'target_missing';
    END IF;
    IF v_class IS NOT NULL THEN
        kind := 'run';
        value := public.fn_dot_iu_record(p_command, p_mode, 'refused', p_actor, v_digest, p_key,
            public.fn_dot_iu_evidence(p_mode, p_client, cardinality(c.statements), v_class, v_closed, v_started,
                CASE WHEN v_class = 'frozen' THEN jsonb_build_object('freeze_ids', to_jsonb(v_frozen)) END),
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
        ELSE
            v_touched := public.fn_dot_iu_rows_touched();
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
        -- The rows the statements changed, counted before the commit;
        -- over the cap (or uncountable under a cap) rolls them back.
        IF v_touched IS NOT NULL THEN
            SELECT d.per_table, d.total INTO v_by_table, v_changed
              FROM public.fn_dot_iu_rows_changed(v_touched, public.fn_dot_iu_rows_touched()) AS d;
        END IF;
        IF c.max_rows IS NOT NULL AND (v_changed IS NULL OR v_changed > c.max_rows) THEN
            RAISE EXCEPTION USING ERRCODE = 'GV093', MESSAGE = 'over the row cap';
        END IF;
        -- A freeze window that covers this commit: read under the lock
        -- that `freeze add` and `freeze remove` take exclusively, so a
        -- window added while the statements ran is seen here.
        PERFORM pg_advisory_xact_lock_shared(hashtextextended('govsql:freeze', 0));
        v_frozen := public.fn_dot_iu_freezes(c.command_name, c.category, clock_timestamp());
        IF cardinality(v_frozen) > 0 THEN
            RAISE EXCEPTION USING ERRCODE = 'GV094', MESSAGE = 'inside a freeze window';
        END IF;
    EXCEPTION
        WHEN SQLSTATE 'GV090' THEN
            IF NOT v_ok THEN
                v_class := 'verification_failed';
            END IF;
        WHEN OTHERS THEN
            -- Rolled back: the dispatcher's own codes are their class, any
            -- other SQLSTATE is the class itself.
            v_class := CASE SQLSTATE
                WHEN 'GV091' THEN 'unexpected_status'
                WHEN 'GV092' THEN 'result_too_large'
                WHEN 'GV093' THEN 'row_cap'
                WHEN 'GV094' THEN 'frozen'
                ELSE SQLSTATE END;
            v_rows := ARRAY[]::text[];
    END;
    IF v_word IS NOT NULL THEN
        v_extra := jsonb_build_object('answered_status', v_word);
    END IF;
    v_extra := v_extra || jsonb_build_object('row_count', cardinality(v_rows));
    IF p_mode = 'apply' THEN
        IF v_pinned IS NOT NULL THEN
            v_extra := v_extra || jsonb_build_object('plan_digest', v_pinned);
        END IF;
        v_extra := v_extra || jsonb_build_object('max_rows', c.max_rows,
            'rows_changed', v_changed, 'rows_by_table', v_by_table);
        IF v_class = 'frozen' THEN
            v_extra := v_extra || jsonb_build_object('freeze_ids', to_jsonb(v_frozen));
        END IF;
    END IF;
    v_status := CASE WHEN v_class IS NOT NULL THEN 'failed' WHEN p_mode = 'apply' THEN 'applied' ELSE 'verified' END;
    IF v_class = 'frozen' THEN
        -- Not a failure of the SQL: the window refused the commit.
        v_status := 'refused';
    END IF;
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
