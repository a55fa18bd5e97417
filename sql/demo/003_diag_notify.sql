-- A drill function for asynchronous notifications: it LISTENs on a
-- channel and NOTIFYs it, so the session that ran it would be sent a
-- notification after the commit (psql prints it amid the job's output).
-- The dispatcher ends every job with UNLISTEN *, so none is delivered.
CREATE FUNCTION public.fn_iu_diag_notify() RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    EXECUTE 'LISTEN govsql_diag';
    PERFORM pg_notify('govsql_diag', 'run 1');
    RETURN jsonb_build_object('status', 'ok');
END
$$;
REVOKE ALL ON FUNCTION public.fn_iu_diag_notify() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION public.fn_iu_diag_notify() TO govsql_owner;
