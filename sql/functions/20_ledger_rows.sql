-- Ledger rows: the 'run' row every entry ends with, a row's evidence, the
-- one writer of a row, and the key rule (a key is its actor's).
--
-- A repeatable file (CREATE OR REPLACE only): see src/migrate.rs.

-- The one 'run' row every entry ends with.
CREATE OR REPLACE FUNCTION public.fn_dot_iu_run_row(
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
-- the daemon knows (job id, rollout id, transport, target, host key, approver, the
-- job's submit and end times, time spent before the call), each a short
-- scalar, and the approvals (who, when, why; at most 9). Never a value.
CREATE OR REPLACE FUNCTION public.fn_dot_iu_evidence(
    p_mode text, p_client jsonb, p_statements int, p_class text, p_closed text[],
    p_started timestamptz, p_extra jsonb
) RETURNS jsonb
LANGUAGE plpgsql STABLE SET search_path = public, pg_temp AS $$
BEGIN
    RETURN coalesce((
        SELECT jsonb_object_agg(e.key, e.value) FROM jsonb_each(coalesce(p_client, '{}'::jsonb)) AS e
        WHERE e.key IN ('job_id', 'rollout_id', 'transport', 'target', 'host_key', 'approved_by', 'submitted_at', 'ended_at', 'reason')
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
    || CASE WHEN jsonb_typeof(p_client -> 'approvals') = 'array' THEN jsonb_build_object('approvals', coalesce((
           SELECT jsonb_agg(jsonb_build_object('by', x.a ->> 'by', 'at', x.a ->> 'at',
                                               'reason', left(x.a ->> 'reason', 200)) ORDER BY x.n)
             FROM jsonb_array_elements(p_client -> 'approvals') WITH ORDINALITY AS x (a, n)
            WHERE x.n <= 9 AND jsonb_typeof(x.a) = 'object' AND length(x.a ->> 'by') <= 128
              AND length(x.a ->> 'at') <= 40), '[]'::jsonb))
       ELSE '{}'::jsonb END
    || coalesce(p_extra, '{}'::jsonb);
END
$$;

-- Writes one ledger row through the log function; returns its 'run' row.
CREATE OR REPLACE FUNCTION public.fn_dot_iu_record(
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

-- The success under a key in a mode, if any: replay when it is this
-- actor's with these params, conflict otherwise. Called under the key's
-- advisory lock.
CREATE OR REPLACE FUNCTION public.fn_dot_iu_key_prior(p_mode text, p_key text, p_actor text, p_digest text)
RETURNS TABLE (run_id bigint, run_status text, replay boolean)
LANGUAGE sql STABLE SET search_path = public, pg_temp AS $$
    SELECT r.run_id, r.run_status, r.actor = p_actor AND r.params_digest = p_digest
      FROM public.dot_iu_command_run r
     WHERE r.idempotency_key = p_key AND r.run_mode = p_mode
       AND r.run_status IN ('planned', 'applied', 'verified')
$$;
