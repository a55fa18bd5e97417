-- Rollback of 003_ledger. Refuses to drop a ledger that holds rows: audit
-- history is never thrown away by a rollback.
DO $$
BEGIN
    IF to_regclass('public.dot_iu_command_run') IS NOT NULL
       AND EXISTS (SELECT 1 FROM public.dot_iu_command_run) THEN
        RAISE EXCEPTION USING ERRCODE = 'GV008',
            MESSAGE = 'dot_iu_command_run holds rows; archive them and drop the table by hand';
    END IF;
END
$$;
DROP FUNCTION IF EXISTS public.fn_dot_iu_apply_begin(text, text, text[], text);
DROP FUNCTION IF EXISTS public.fn_dot_iu_command_log(text, text, text, text, text, text, jsonb);
DROP TABLE IF EXISTS public.dot_iu_command_run;
DROP FUNCTION IF EXISTS public.fn_dot_iu_command_run_immutable();
DELETE FROM public.dot_schema_migrations WHERE version = '003_ledger';
