-- 004_views: the operator surface in SQL, for auditors and UIs.

-- The catalog left-joined to per-command run counts.
CREATE VIEW public.v_dot_iu_command_registry AS
SELECT c.command_name,
       c.category,
       c.mutating,
       c.retired,
       count(r.run_id)::bigint                                   AS total_runs,
       count(r.run_id) FILTER (WHERE r.run_status = 'applied')::bigint AS applied_runs,
       count(r.run_id) FILTER (WHERE r.run_status = 'refused')::bigint AS refused_runs,
       count(r.run_id) FILTER (WHERE r.run_status = 'failed')::bigint  AS failed_runs,
       max(r.created_at)                                         AS last_run_at,
       (SELECT l.run_status FROM public.dot_iu_command_run l
         WHERE l.command_name = c.command_name
         ORDER BY l.created_at DESC, l.run_id DESC LIMIT 1)     AS last_status
FROM public.dot_iu_command_catalog c
LEFT JOIN public.dot_iu_command_run r ON r.command_name = c.command_name
GROUP BY c.command_name, c.category, c.mutating, c.retired;

-- One row: the runtime's health at a glance (one pass over the ledger).
CREATE VIEW public.v_dot_iu_command_run_health AS
SELECT count(*)::bigint                                          AS total_runs,
       count(*) FILTER (WHERE r.run_mode = 'apply')::bigint      AS apply_runs,
       count(*) FILTER (WHERE r.run_status = 'applied')::bigint  AS applied_runs,
       count(*) FILTER (WHERE r.run_status = 'refused')::bigint  AS refused_runs,
       count(*) FILTER (WHERE r.run_status = 'failed')::bigint   AS failed_runs,
       count(DISTINCT r.command_name)::bigint                    AS distinct_commands,
       (SELECT count(*) FROM public.dot_iu_command_catalog WHERE NOT retired)::bigint AS catalog_size
FROM public.dot_iu_command_run r;

REVOKE ALL ON TABLE public.v_dot_iu_command_registry FROM PUBLIC;
REVOKE ALL ON TABLE public.v_dot_iu_command_run_health FROM PUBLIC;
