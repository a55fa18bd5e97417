-- Least privilege for databases migrated with an earlier demo, whose
-- demo_001 granted every public.fn_iu_* function to the runtime role after
-- the dispatcher migration had revoked them: the runtime role may execute
-- only the dispatcher's entries, and the dispatcher's owner runs the
-- governed functions. Idempotent.
-- psql variable :runtime_role names the runtime role.

SELECT format('REVOKE ALL ON FUNCTION %s FROM %I', p.oid::regprocedure, :'runtime_role')
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = 'public' AND left(p.proname, 6) = 'fn_iu_'
\gexec

SELECT format('GRANT EXECUTE ON FUNCTION %s TO govsql_owner', p.oid::regprocedure)
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = 'public' AND left(p.proname, 6) = 'fn_iu_'
\gexec
