-- The catalog against the database: whether each command's statements
-- resolve, run by `govsql migrate` after the seed.
--
-- A repeatable file (CREATE OR REPLACE only): see src/migrate.rs.

-- Whether a command's stored statements resolve with the argument types
-- they use (each SELECT is prepared, never run) and its targets exist.
CREATE OR REPLACE FUNCTION public.fn_dot_iu_command_resolves(p_statements text[], p_kinds text[], p_targets text[])
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
CREATE OR REPLACE FUNCTION public.fn_dot_iu_catalog_resolve(p_runtime_role text)
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
