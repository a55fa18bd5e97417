-- Rollback of 001_gates: gate functions, then dot_config. The runtime role
-- is cluster-wide and may serve other databases: it is dropped only when
-- nothing else refers to it.
DROP FUNCTION IF EXISTS public.fn_dot_iu_gate_assert(text[]);
DROP FUNCTION IF EXISTS public.fn_dot_iu_closed_gates(text[]);
DROP FUNCTION IF EXISTS public.fn_dot_iu_gate_snapshot();
DROP FUNCTION IF EXISTS public.fn_dot_iu_operator_runtime_enabled();
DROP FUNCTION IF EXISTS public.fn_dot_iu_gate_is_open(text);
DROP TABLE IF EXISTS public.dot_config;
DELETE FROM public.dot_schema_migrations WHERE version = '001_gates';
