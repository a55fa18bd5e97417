-- No value reaches a server-side store, checked before any value is sent.
--
-- * fn_dot_iu_log_exposure() also names pg_stat_statements (a job's COPY
--   is a utility statement, stored verbatim unless utility tracking is off
--   for the role), debug_print_*, log_transaction_sample_rate, and
--   pgaudit's parameter logging.
-- * fn_dot_iu_preflight() raises GV009 when a value could be exposed; the
--   runtime's per-job preamble calls it in its own statement, which holds
--   no value, so psql stops (ON_ERROR_STOP) before the statement that
--   carries the values is sent. A per-database role setting, a reload or
--   a session-level override are all seen, since it runs in the job's own
--   session, every job.
-- * fn_dot_iu_status() lets the preflight be called, and reports the
--   runtime role's own settings (a role can change its own defaults).
-- * The runtime role's settings hide what the extensions would store.
-- psql variable :runtime_role names the runtime role.

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

CREATE FUNCTION public.fn_dot_iu_preflight() RETURNS text
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
                        'fn_dot_iu_fail', 'fn_dot_iu_status', 'fn_dot_iu_ledger', 'fn_dot_iu_preflight'))
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

REVOKE ALL ON FUNCTION public.fn_dot_iu_preflight() FROM PUBLIC;
ALTER FUNCTION public.fn_dot_iu_preflight() OWNER TO govsql_owner;
GRANT EXECUTE ON FUNCTION public.fn_dot_iu_preflight() TO :"runtime_role";

-- The role's settings that keep values out of what the extensions store
-- (placeholders when an extension is not loaded; superuser-only settings,
-- which is why migrate runs as the admin role). Set only when missing;
-- retried when another database's migration updates them at once.
SELECT set_config('govsql.runtime_role', :'runtime_role', true) AS govsql_ignored \gset
DO $$
DECLARE
    v_role    text := current_setting('govsql.runtime_role');
    v_wanted  text[] := ARRAY['log_transaction_sample_rate=0', 'debug_print_parse=off',
        'debug_print_rewritten=off', 'debug_print_plan=off', 'pg_stat_statements.track=none',
        'pg_stat_statements.track_utility=off', 'auto_explain.log_min_duration=-1', 'pgaudit.log=none'];
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
