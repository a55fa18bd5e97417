-- Rollback of 002_catalog.
DROP FUNCTION IF EXISTS public.fn_dot_iu_catalog_digest();
DROP TABLE IF EXISTS public.dot_iu_catalog_state;
DROP TABLE IF EXISTS public.dot_iu_command_catalog;
DELETE FROM public.dot_schema_migrations WHERE version = '002_catalog';
