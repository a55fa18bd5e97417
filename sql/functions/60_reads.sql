-- What the daemon reads: the log exposure check and the per-job preflight
-- (no value reaches a server-side store: GV009 before any value is sent),
-- the status for `health` and `catalog check`, and the ledger for
-- `govsql log` (no values: there are none).
--
-- A repeatable file (CREATE OR REPLACE only): see src/migrate.rs.

-- The settings under which a value would reach the server log or an
-- extension's store (pg_stat_statements, debug_print_*,
-- log_transaction_sample_rate, pgaudit's parameter logging).
CREATE OR REPLACE FUNCTION public.fn_dot_iu_log_exposure() RETURNS text[]
LANGUAGE plpgsql STABLE SET search_path = public, pg_temp AS $$
BEGIN
    RETURN (SELECT coalesce(array_agg(problem ORDER BY problem), ARRAY[]::text[]) FROM (
        SELECT 'log_statement' AS problem WHERE current_setting('log_statement') <> 'none'
        UNION ALL SELECT 'log_min_error_statement' WHERE current_setting('log_min_error_statement') <> 'panic'
        UNION ALL SELECT 'log_min_duration_statement' WHERE current_setting('log_min_duration_statement') <> '-1'
        UNION ALL SELECT 'log_min_duration_sample' WHERE current_setting('log_min_duration_sample') <> '-1'
        UNION ALL SELECT 'log_transaction_sample_rate' WHERE current_setting('log_transaction_sample_rate')::float8 > 0
        UNION ALL SELECT 'log_parameter_max_length' WHERE current_setting('log_parameter_max_length') <> '0'
        UNION ALL SELECT 'log_parameter_max_length_on_error' WHERE current_setting('log_parameter_max_length_on_error') <> '0'
        UNION ALL SELECT 'debug_print_parse' WHERE current_setting('debug_print_parse') = 'on'
        UNION ALL SELECT 'debug_print_rewritten' WHERE current_setting('debug_print_rewritten') = 'on'
        UNION ALL SELECT 'debug_print_plan' WHERE current_setting('debug_print_plan') = 'on'
        UNION ALL SELECT 'pgaudit' WHERE coalesce(current_setting('pgaudit.log', true), 'none') NOT IN ('none', '')
        UNION ALL SELECT 'pgaudit.log_parameter' WHERE coalesce(current_setting('pgaudit.log_parameter', true), 'off') = 'on'
            AND coalesce(current_setting('pgaudit.log', true), 'none') NOT IN ('none', '')
        UNION ALL SELECT 'auto_explain' WHERE coalesce(current_setting('auto_explain.log_min_duration', true), '-1') <> '-1'
        UNION ALL SELECT 'pg_stat_statements' WHERE current_setting('pg_stat_statements.track', true) IS NOT NULL
            AND current_setting('pg_stat_statements.track', true) <> 'none'
            AND coalesce(current_setting('pg_stat_statements.track_utility', true), 'on') <> 'off'
    ) AS p);
END
$$;

-- Raises GV009 when a value could be exposed. The runtime's per-job
-- preamble calls it in its own statement, which holds no value, so psql
-- stops (ON_ERROR_STOP) before the statement that carries the values is
-- sent; it runs in the job's own session, every job, so a role setting, a
-- reload or a session-level override are all seen.
CREATE OR REPLACE FUNCTION public.fn_dot_iu_preflight() RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    v_problems text[] := public.fn_dot_iu_log_exposure();
BEGIN
    IF cardinality(v_problems) > 0 THEN
        RAISE EXCEPTION USING ERRCODE = 'GV009',
            MESSAGE = 'a value could reach a server-side store: ' || array_to_string(v_problems, ', ');
    END IF;
    RETURN 'ok';
END
$$;

-- The catalog digest, unavailable commands, log exposure and the
-- caller's excess privileges (for `health` and `catalog check`).
CREATE OR REPLACE FUNCTION public.fn_dot_iu_status() RETURNS TABLE (kind text, value text)
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
                  JOIN pg_namespace n ON n.oid = p.pronamespace
                  WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
                    AND NOT (n.nspname = 'public' AND p.proname IN ('fn_dot_iu_dispatch', 'fn_dot_iu_refuse',
                        'fn_dot_iu_fail', 'fn_dot_iu_status', 'fn_dot_iu_ledger', 'fn_dot_iu_preflight', 'fn_dot_iu_pin'))
                    AND has_function_privilege(v_role, p.oid, 'EXECUTE')
    ) AS problems ORDER BY 2;
    -- Defaults the role (or anyone for it) set beyond what migrate sets:
    -- a role can change its own defaults, and the dispatcher must not
    -- rely on them.
    RETURN QUERY SELECT 'role_setting'::text, cfg FROM (
        SELECT unnest(s.setconfig) AS cfg FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole
         WHERE r.rolname = v_role AND s.setdatabase IN (0, (SELECT oid FROM pg_database WHERE datname = current_database()))
    ) AS c
    WHERE split_part(cfg, '=', 1) NOT IN ('log_statement', 'log_min_error_statement', 'log_min_duration_statement',
        'log_min_duration_sample', 'log_parameter_max_length', 'log_parameter_max_length_on_error',
        'log_transaction_sample_rate', 'debug_print_parse', 'debug_print_rewritten', 'debug_print_plan',
        'pg_stat_statements.track', 'pg_stat_statements.track_utility', 'auto_explain.log_min_duration',
        'pgaudit.log')
    ORDER BY 2;
END
$$;

-- `govsql log`: the query is built from the filters given, so a
-- non-admin's actor filter is a plain equality that the (actor, run_id)
-- index serves.
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
            ''target'', r.evidence ->> ''target'',
            ''plan_digest'', r.evidence ->> ''plan_digest'',
            ''approvers'', coalesce((SELECT string_agg(a ->> ''by'', '','') FROM jsonb_array_elements(
                CASE WHEN jsonb_typeof(r.evidence -> ''approvals'') = ''array'' THEN r.evidence -> ''approvals'' END) AS a),
                r.evidence ->> ''approved_by''))::text
          FROM public.dot_iu_command_run r WHERE true' || v_where ||
        ' ORDER BY r.run_id DESC LIMIT $7'
        USING f ->> 'command', f ->> 'status', f ->> 'mode', f ->> 'actor', f ->> 'target',
              (f ->> 'since')::timestamptz, least(greatest(coalesce(p_limit, 50), 1), 1000);
END
$$;
