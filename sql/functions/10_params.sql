-- The params of a job, judged without ever storing one: the keyed md5
-- digest the ledger keeps, and the check of params against the command's
-- declared specs.
--
-- A repeatable file (CREATE OR REPLACE only): see src/migrate.rs.

-- md5 hex of the secret followed by the compact JSON
-- [command, [[key, value], ...]], keys sorted bytewise, values as text
-- (params that are not a JSON object count as none).
--
-- The helpers the entries call on every job are PL/pgSQL, not SQL: a SQL
-- function that cannot be inlined (SECURITY DEFINER, a SET clause) parses
-- and plans its body again in every transaction, while PL/pgSQL keeps its
-- plans for the life of the session (session mode: ~0.2-0.3 ms each, per
-- job, measured here).
CREATE OR REPLACE FUNCTION public.fn_dot_iu_params_digest(p_command text, p_params jsonb) RETURNS text
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
CREATE OR REPLACE FUNCTION public.fn_dot_iu_params_problem(p_specs jsonb, p_params jsonb) RETURNS text
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
