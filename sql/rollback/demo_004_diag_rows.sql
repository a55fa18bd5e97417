DROP FUNCTION IF EXISTS public.fn_iu_diag_touch_rows_undone(bigint, bigint);
DROP FUNCTION IF EXISTS public.fn_iu_diag_touch_rows(bigint, bigint);
DELETE FROM public.dot_schema_migrations WHERE version = 'demo_004_diag_rows';
