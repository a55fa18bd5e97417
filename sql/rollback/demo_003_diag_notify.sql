DROP FUNCTION IF EXISTS public.fn_iu_diag_notify();
DELETE FROM public.dot_schema_migrations WHERE version = 'demo_003_diag_notify';
