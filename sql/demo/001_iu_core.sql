-- The demo IU Core world: collections, pieces, information units, and the
-- governed public.fn_iu_* functions the shipped catalog calls. Every
-- function returns jsonb with a "status" field; mutating functions assert
-- their own gate as well (defence in depth: the runtime checks it first).
-- psql variable :runtime_role names the runtime role.

CREATE TABLE public.iu_collection (
    collection_id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    title         text NOT NULL CHECK (length(title) BETWEEN 1 AND 200),
    archived      boolean NOT NULL DEFAULT false,
    published     boolean NOT NULL DEFAULT false,
    visible       boolean NOT NULL DEFAULT true,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE public.iu_piece (
    piece_id      uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    collection_id uuid NOT NULL REFERENCES public.iu_collection,
    body          text NOT NULL CHECK (octet_length(body) <= 1048576),
    position      bigint NOT NULL DEFAULT 0,
    deleted_at    timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE public.iu_information_unit (
    unit_id    uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    piece_id   uuid NOT NULL REFERENCES public.iu_piece ON DELETE CASCADE,
    kind       text NOT NULL,
    payload    jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Written by the diagnostics function that fails after writing.
CREATE TABLE public.iu_diag_probe (
    probe_id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now()
);

INSERT INTO public.dot_config (key, value) VALUES ('iu_core.lifecycle_enabled', 'false')
ON CONFLICT (key) DO NOTHING;

CREATE FUNCTION public.fn_iu_collection_healthcheck() RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    SELECT jsonb_build_object(
        'status', 'ok',
        'collections', (SELECT count(*) FROM public.iu_collection),
        'pieces', (SELECT count(*) FROM public.iu_piece WHERE deleted_at IS NULL),
        'orphans', (SELECT count(*) FROM public.iu_piece p
                     WHERE NOT EXISTS (SELECT 1 FROM public.iu_collection c WHERE c.collection_id = p.collection_id)))
$$;

CREATE FUNCTION public.fn_iu_collection_validate(p_collection_id uuid) RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    v_c public.iu_collection%ROWTYPE;
BEGIN
    SELECT * INTO v_c FROM public.iu_collection WHERE collection_id = p_collection_id;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('status', 'not_found');
    END IF;
    RETURN jsonb_build_object(
        'status', CASE WHEN v_c.archived THEN 'archived' ELSE 'ok' END,
        'collection_id', v_c.collection_id,
        'pieces', (SELECT count(*) FROM public.iu_piece WHERE collection_id = p_collection_id AND deleted_at IS NULL));
END
$$;

CREATE FUNCTION public.fn_iu_collection_create(p_title text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    v_id uuid;
BEGIN
    PERFORM public.fn_dot_iu_gate_assert(ARRAY['iu_core.composer_enabled']);
    INSERT INTO public.iu_collection (title) VALUES (p_title) RETURNING collection_id INTO v_id;
    RETURN jsonb_build_object('status', 'created', 'collection_id', v_id);
END
$$;

CREATE FUNCTION public.fn_iu_collection_rename(p_collection_id uuid, p_title text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    PERFORM public.fn_dot_iu_gate_assert(ARRAY['iu_core.composer_enabled']);
    UPDATE public.iu_collection SET title = p_title WHERE collection_id = p_collection_id;
    RETURN jsonb_build_object('status', CASE WHEN FOUND THEN 'renamed' ELSE 'not_found' END);
END
$$;

CREATE FUNCTION public.fn_iu_collection_archive(p_collection_id uuid) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    PERFORM public.fn_dot_iu_gate_assert(ARRAY['iu_core.structure_ops_enabled']);
    UPDATE public.iu_collection SET archived = true WHERE collection_id = p_collection_id;
    RETURN jsonb_build_object('status', CASE WHEN FOUND THEN 'archived' ELSE 'not_found' END);
END
$$;

CREATE FUNCTION public.fn_iu_collection_publish(p_collection_id uuid, p_published boolean) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    PERFORM public.fn_dot_iu_gate_assert(ARRAY['iu_core.lifecycle_enabled']);
    UPDATE public.iu_collection SET published = p_published
     WHERE collection_id = p_collection_id AND NOT archived;
    RETURN jsonb_build_object('status', CASE WHEN FOUND THEN 'ok' ELSE 'not_found' END, 'published', p_published);
END
$$;

CREATE FUNCTION public.fn_iu_collection_set_visibility(p_collection_id uuid, p_visible boolean) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    PERFORM public.fn_dot_iu_gate_assert(ARRAY['iu_core.lifecycle_enabled']);
    UPDATE public.iu_collection SET visible = p_visible WHERE collection_id = p_collection_id;
    RETURN jsonb_build_object('status', CASE WHEN FOUND THEN 'ok' ELSE 'not_found' END, 'visible', p_visible);
END
$$;

CREATE FUNCTION public.fn_iu_add_piece(p_collection_id uuid, p_body text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    v_id uuid;
BEGIN
    PERFORM public.fn_dot_iu_gate_assert(ARRAY['iu_core.composer_enabled']);
    IF NOT EXISTS (SELECT 1 FROM public.iu_collection WHERE collection_id = p_collection_id AND NOT archived) THEN
        RAISE EXCEPTION USING ERRCODE = 'IU404', MESSAGE = 'collection not found or archived';
    END IF;
    INSERT INTO public.iu_piece (collection_id, body) VALUES (p_collection_id, p_body) RETURNING piece_id INTO v_id;
    RETURN jsonb_build_object('status', 'created', 'piece_id', v_id);
END
$$;

CREATE FUNCTION public.fn_iu_piece_get(p_piece_id uuid) RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    SELECT coalesce(
        (SELECT jsonb_build_object('status', 'ok', 'piece_id', piece_id, 'collection_id', collection_id,
                                   'body', body, 'position', position, 'deleted', deleted_at IS NOT NULL)
           FROM public.iu_piece WHERE piece_id = p_piece_id),
        jsonb_build_object('status', 'not_found'))
$$;

CREATE FUNCTION public.fn_iu_piece_set_position(p_piece_id uuid, p_position bigint) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    PERFORM public.fn_dot_iu_gate_assert(ARRAY['iu_core.structure_ops_enabled']);
    UPDATE public.iu_piece SET position = p_position WHERE piece_id = p_piece_id;
    RETURN jsonb_build_object('status', CASE WHEN FOUND THEN 'ok' ELSE 'not_found' END);
END
$$;

CREATE FUNCTION public.fn_iu_delete_piece_soft(p_piece_id uuid) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    PERFORM public.fn_dot_iu_gate_assert(ARRAY['iu_core.structure_ops_enabled']);
    UPDATE public.iu_piece SET deleted_at = now() WHERE piece_id = p_piece_id AND deleted_at IS NULL;
    RETURN jsonb_build_object('status', CASE WHEN FOUND THEN 'deleted' ELSE 'not_found' END);
END
$$;

CREATE FUNCTION public.fn_iu_restore_piece(p_piece_id uuid) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    PERFORM public.fn_dot_iu_gate_assert(ARRAY['iu_core.structure_ops_enabled']);
    UPDATE public.iu_piece SET deleted_at = NULL WHERE piece_id = p_piece_id AND deleted_at IS NOT NULL;
    RETURN jsonb_build_object('status', CASE WHEN FOUND THEN 'restored' ELSE 'not_found' END);
END
$$;

CREATE FUNCTION public.fn_iu_purge_piece(p_piece_id uuid) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    PERFORM public.fn_dot_iu_gate_assert(ARRAY['iu_core.lifecycle_enabled']);
    DELETE FROM public.iu_piece WHERE piece_id = p_piece_id AND deleted_at IS NOT NULL;
    RETURN jsonb_build_object('status', CASE WHEN FOUND THEN 'purged' ELSE 'not_found' END);
END
$$;

CREATE FUNCTION public.fn_iu_add_unit(p_piece_id uuid, p_kind text, p_payload jsonb) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    v_id uuid;
BEGIN
    PERFORM public.fn_dot_iu_gate_assert(ARRAY['iu_core.composer_enabled']);
    INSERT INTO public.iu_information_unit (piece_id, kind, payload)
    VALUES (p_piece_id, p_kind, p_payload) RETURNING unit_id INTO v_id;
    RETURN jsonb_build_object('status', 'created', 'unit_id', v_id);
END
$$;

CREATE FUNCTION public.fn_iu_diag_sleep(p_seconds bigint) RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    IF p_seconds < 0 OR p_seconds > 3600 THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'seconds out of range 0..3600';
    END IF;
    PERFORM pg_sleep(p_seconds);
    RETURN jsonb_build_object('status', 'ok', 'slept_s', p_seconds);
END
$$;

-- Returns its argument unchanged, NULL included (output-exactness drills).
CREATE FUNCTION public.fn_iu_diag_echo(p_value text) RETURNS text
LANGUAGE sql IMMUTABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    SELECT p_value
$$;

-- A large result for transport drills: p_bytes characters of awkward text.
CREATE FUNCTION public.fn_iu_diag_blob(p_bytes bigint) RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    v_unit text := E'a\t~|~\\\n"\u00e9\r';
BEGIN
    IF p_bytes < 0 OR p_bytes > 67108864 THEN
        RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'bytes out of range 0..64 MiB';
    END IF;
    RETURN jsonb_build_object('status', 'ok',
        'blob', left(repeat(v_unit, (p_bytes / length(v_unit) + 1)::int), p_bytes::int));
END
$$;

-- Writes a probe row, then raises: the atomicity drill. Nothing it wrote
-- may survive.
CREATE FUNCTION public.fn_iu_diag_write_then_fail() RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    PERFORM public.fn_dot_iu_gate_assert(ARRAY['iu_core.composer_enabled']);
    INSERT INTO public.iu_diag_probe DEFAULT VALUES;
    RAISE EXCEPTION USING ERRCODE = 'IU500', MESSAGE = 'diagnostic failure after a write';
END
$$;

REVOKE ALL ON TABLE public.iu_collection, public.iu_piece, public.iu_information_unit, public.iu_diag_probe FROM PUBLIC;

DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN SELECT p.oid::regprocedure FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE n.nspname = 'public' AND left(p.proname, 6) = 'fn_iu_' LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
END
$$;

-- The governed functions are run by the dispatcher (SECURITY DEFINER,
-- owned by govsql_owner); the runtime role gets none of them.
SELECT format('GRANT EXECUTE ON FUNCTION %s TO govsql_owner', p.oid::regprocedure)
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = 'public' AND left(p.proname, 6) = 'fn_iu_'
\gexec
