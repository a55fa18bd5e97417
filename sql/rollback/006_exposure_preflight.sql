-- Rollback of 006_exposure_preflight: the preflight goes; the status and
-- exposure functions stay in their 006 form until 005's rollback drops
-- them; the role's settings stay (they only hide values).
DROP FUNCTION IF EXISTS public.fn_dot_iu_preflight();
DELETE FROM public.dot_schema_migrations WHERE version = '006_exposure_preflight';
