-- 001_gates: the gate table, the runtime role, and the gate functions.
--
-- Gates are rows of dot_config with value 'true' or 'false', default 'false'.
-- Only a database admin opens a gate: the runtime role has no privilege on
-- dot_config and can only read it through the SECURITY DEFINER functions.
-- psql variable :runtime_role names the runtime role (set by govsql migrate).

CREATE TABLE public.dot_config (
    key        text PRIMARY KEY CHECK (key ~ '^[a-z0-9_.]{1,100}$'),
    value      text NOT NULL DEFAULT 'false' CHECK (value IN ('true', 'false')),
    updated_at timestamptz NOT NULL DEFAULT now()
);

INSERT INTO public.dot_config (key, value) VALUES
    ('iu_core.operator_runtime_enabled', 'false'),
    ('iu_core.composer_enabled', 'false'),
    ('iu_core.structure_ops_enabled', 'false');

-- The runtime role is cluster-wide; create it once, never with privileges.
SELECT format('CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT', :'runtime_role')
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'runtime_role')
\gexec

-- True only when the gate exists and is exactly 'true'.
CREATE FUNCTION public.fn_dot_iu_gate_is_open(p_key text) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    SELECT coalesce((SELECT value = 'true' FROM public.dot_config WHERE key = p_key), false)
$$;

-- The gate function of the seed: is the runtime apply gate open?
CREATE FUNCTION public.fn_dot_iu_operator_runtime_enabled() RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    SELECT public.fn_dot_iu_gate_is_open('iu_core.operator_runtime_enabled')
$$;

-- Every gate and its value, for the runtime's live gate snapshot.
CREATE FUNCTION public.fn_dot_iu_gate_snapshot() RETURNS TABLE (gate_key text, gate_value text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    SELECT key, value FROM public.dot_config ORDER BY key
$$;

-- The gates of p_gates that are not open (missing gates count as shut).
CREATE FUNCTION public.fn_dot_iu_closed_gates(p_gates text[]) RETURNS text[]
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    SELECT coalesce(array_agg(DISTINCT g ORDER BY g), ARRAY[]::text[])
    FROM unnest(p_gates) AS g
    WHERE NOT public.fn_dot_iu_gate_is_open(g)
$$;

-- Raises SQLSTATE GV001 unless every gate of p_gates is exactly 'true'.
-- Takes FOR SHARE locks on the gate rows, so a gate cannot be shut under a
-- running apply transaction: the admin's UPDATE waits for it to end.
CREATE FUNCTION public.fn_dot_iu_gate_assert(p_gates text[]) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    v_closed text[];
BEGIN
    PERFORM 1 FROM public.dot_config WHERE key = ANY (p_gates) FOR SHARE;
    v_closed := public.fn_dot_iu_closed_gates(p_gates);
    IF cardinality(v_closed) > 0 THEN
        RAISE EXCEPTION USING ERRCODE = 'GV001',
            MESSAGE = 'gate closed: ' || array_to_string(v_closed, ', ');
    END IF;
END
$$;

REVOKE ALL ON TABLE public.dot_config FROM PUBLIC;
REVOKE ALL ON FUNCTION public.fn_dot_iu_gate_is_open(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION public.fn_dot_iu_operator_runtime_enabled() FROM PUBLIC;
REVOKE ALL ON FUNCTION public.fn_dot_iu_gate_snapshot() FROM PUBLIC;
REVOKE ALL ON FUNCTION public.fn_dot_iu_closed_gates(text[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION public.fn_dot_iu_gate_assert(text[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION public.fn_dot_iu_gate_is_open(text) TO :"runtime_role";
GRANT EXECUTE ON FUNCTION public.fn_dot_iu_operator_runtime_enabled() TO :"runtime_role";
GRANT EXECUTE ON FUNCTION public.fn_dot_iu_gate_snapshot() TO :"runtime_role";
GRANT EXECUTE ON FUNCTION public.fn_dot_iu_closed_gates(text[]) TO :"runtime_role";
GRANT EXECUTE ON FUNCTION public.fn_dot_iu_gate_assert(text[]) TO :"runtime_role";
