-- 002_catalog: the command vocabulary as a queryable table, and the digest
-- of the catalog file it was seeded from (drift detection).

CREATE TABLE public.dot_iu_command_catalog (
    command_name      text PRIMARY KEY CHECK (command_name ~ '^[a-z][a-z0-9_]{0,62}$'),
    category          text NOT NULL,
    description       text NOT NULL,
    mutating          boolean NOT NULL,
    reversible        boolean NOT NULL,
    inverse_command   text,
    rollback_note     text NOT NULL DEFAULT '',
    requires_approval boolean NOT NULL DEFAULT false,
    target_functions  text[] NOT NULL,
    required_gates    text[] NOT NULL,
    retired           boolean NOT NULL DEFAULT false,
    updated_at        timestamptz NOT NULL DEFAULT now()
);

-- One row: the digest of the catalog file last seeded.
CREATE TABLE public.dot_iu_catalog_state (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    digest    text NOT NULL,
    seeded_at timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION public.fn_dot_iu_catalog_digest() RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    SELECT coalesce((SELECT digest FROM public.dot_iu_catalog_state), '')
$$;

REVOKE ALL ON TABLE public.dot_iu_command_catalog FROM PUBLIC;
REVOKE ALL ON TABLE public.dot_iu_catalog_state FROM PUBLIC;
REVOKE ALL ON FUNCTION public.fn_dot_iu_catalog_digest() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION public.fn_dot_iu_catalog_digest() TO :"runtime_role";
