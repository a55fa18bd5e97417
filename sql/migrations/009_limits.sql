-- 009_limits: what an apply may change, and when.
--
-- approvals_required: how many distinct approvers (none the submitter) a
-- requires_approval command needs; the dispatcher counts the approvals
-- the daemon asserts.
--
-- max_rows: a mutating command's cap on the rows one apply may change,
-- counted inside the applying transaction (sql/functions/30_dispatch.sql);
-- NULL means no cap. Seeded from the catalog file like every column.
--
-- Plan digests: a planned row's evidence records its plan digest and what
-- it covers; an apply pinned to a digest finds that row, and the applied
-- row that used it, by this index.
--
-- dot_iu_freeze: freeze windows. An apply that would commit inside a
-- window that covers its command (by name, by category, or every command
-- when both are NULL) is refused `frozen`. Only the admin identity writes
-- here (`govsql freeze add|remove`); a window is never deleted, its removal
-- is recorded with who and why. The dispatcher reads it under a shared
-- advisory lock that `freeze add` and `freeze remove` take exclusively, so
-- a window added while an apply runs is seen by that apply's last check.
ALTER TABLE public.dot_iu_command_catalog
    ADD COLUMN max_rows bigint CHECK (max_rows IS NULL OR max_rows >= 0),
    ADD COLUMN approvals_required integer NOT NULL DEFAULT 1 CHECK (approvals_required BETWEEN 1 AND 9);

CREATE TABLE public.dot_iu_freeze (
    freeze_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    starts_at      timestamptz NOT NULL,
    ends_at        timestamptz NOT NULL,
    command_name   text CHECK (command_name ~ '^[a-z][a-z0-9_]{0,62}$'),
    category       text CHECK (category ~ '^[a-z][a-z0-9_-]{0,62}$'),
    reason         text NOT NULL CHECK (length(reason) BETWEEN 1 AND 500),
    created_by     text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    removed_at     timestamptz,
    removed_by     text,
    removed_reason text,
    CHECK (ends_at > starts_at),
    CHECK (command_name IS NULL OR category IS NULL),
    CHECK ((removed_at IS NULL) = (removed_by IS NULL))
);
CREATE INDEX dot_iu_freeze_live_idx ON public.dot_iu_freeze (ends_at) WHERE removed_at IS NULL;
REVOKE ALL ON TABLE public.dot_iu_freeze FROM PUBLIC;
GRANT SELECT ON public.dot_iu_freeze TO govsql_owner;

CREATE INDEX dot_iu_command_run_plan_idx ON public.dot_iu_command_run ((evidence ->> 'plan_digest'))
    WHERE evidence ? 'plan_digest';
