-- Drill functions for row caps and freeze windows: they insert a number
-- of probe rows (one of them also inserts rows in a subtransaction that
-- it rolls back), optionally sleeping first, so a test can count what an
-- apply changed and hold it open across a window's start.
CREATE FUNCTION public.fn_iu_diag_touch_rows(p_rows bigint, p_sleep_ms bigint) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    IF p_rows < 0 OR p_rows > 1000000 OR p_sleep_ms < 0 OR p_sleep_ms > 600000 THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'rows or sleep out of range';
    END IF;
    PERFORM pg_sleep(p_sleep_ms / 1000.0);
    INSERT INTO public.iu_diag_probe SELECT FROM generate_series(1, p_rows);
    RETURN jsonb_build_object('status', 'ok', 'rows', p_rows);
END
$$;

CREATE FUNCTION public.fn_iu_diag_touch_rows_undone(p_rows bigint, p_undone bigint) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    IF p_rows < 0 OR p_rows > 1000000 OR p_undone < 0 OR p_undone > 1000000 THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'rows out of range';
    END IF;
    INSERT INTO public.iu_diag_probe SELECT FROM generate_series(1, p_rows);
    BEGIN
        INSERT INTO public.iu_diag_probe SELECT FROM generate_series(1, p_undone);
        RAISE EXCEPTION USING ERRCODE = 'IU501', MESSAGE = 'undo the inner block';
    EXCEPTION WHEN SQLSTATE 'IU501' THEN
        NULL;
    END;
    RETURN jsonb_build_object('status', 'ok', 'rows', p_rows);
END
$$;
REVOKE ALL ON FUNCTION public.fn_iu_diag_touch_rows(bigint, bigint),
    public.fn_iu_diag_touch_rows_undone(bigint, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION public.fn_iu_diag_touch_rows(bigint, bigint),
    public.fn_iu_diag_touch_rows_undone(bigint, bigint) TO govsql_owner;
