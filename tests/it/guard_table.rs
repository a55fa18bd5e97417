//! The guard, table-driven: statements accepted and refused by the real
//! PostgreSQL parser. Targets of the pretend command: fn_a, fn_b.

use govsql::guard::{check_statement, GuardError, StatementKind};

fn targets() -> Vec<String> {
    vec!["fn_a".into(), "fn_b".into()]
}

const ACCEPTED: &[(&str, StatementKind)] = &[
    ("SELECT public.fn_a()", StatementKind::Select),
    ("select PUBLIC.FN_A()", StatementKind::Select),
    ("SELECT public.fn_a($q1$x$q1$::text)", StatementKind::Select),
    (
        "SELECT public.fn_a($q1$00000000-0000-0000-0000-000000000000$q1$::uuid, $q2$1$q2$::bigint)",
        StatementKind::Select,
    ),
    (
        "SELECT public.fn_a(true, NULL::jsonb)",
        StatementKind::Select,
    ),
    ("SELECT public.fn_a(), public.fn_b()", StatementKind::Select),
    ("SELECT * FROM public.fn_a()", StatementKind::Select),
    (
        "SELECT public.fn_a(p_x => 'v'::text)",
        StatementKind::Select,
    ),
    (
        "SELECT public.fn_a($q$; DROP TABLE t; --$q$::text)",
        StatementKind::Select,
    ),
    (
        "SELECT public.fn_a($q$\n\\! touch /tmp/x\n$q$::text)",
        StatementKind::Select,
    ),
    ("SELECT public.\"fn_a\"()", StatementKind::Select),
    (
        "SELECT public.fn_a() -- trailing comment",
        StatementKind::Select,
    ),
    (
        "DO $$ BEGIN PERFORM public.fn_a(); END $$",
        StatementKind::Do,
    ),
    (
        "DO $$ BEGIN IF public.fn_b() THEN PERFORM public.fn_a(); END IF; END $$",
        StatementKind::Do,
    ),
    (
        "DO LANGUAGE plpgsql $$ BEGIN PERFORM public.fn_a(); END $$",
        StatementKind::Do,
    ),
];

const REFUSED: &[(&str, &str)] = &[
    ("", "no statement"),
    ("INSERT INTO t VALUES (1)", "DML insert"),
    ("UPDATE t SET x = 1", "DML update"),
    ("DELETE FROM t", "DML delete"),
    ("DROP TABLE t", "DDL"),
    ("CREATE TABLE t (x int)", "DDL create"),
    ("TRUNCATE dot_iu_command_run", "truncate"),
    ("ALTER ROLE govsql_runtime SUPERUSER", "alter role"),
    ("GRANT ALL ON t TO public", "grant"),
    ("SET ROLE postgres", "utility"),
    ("COPY t TO PROGRAM 'touch /tmp/x'", "copy program"),
    ("COPY (SELECT public.fn_a()) TO '/tmp/x'", "copy to file"),
    ("SELECT public.fn_a(); DROP TABLE t", "two statements"),
    ("SELECT public.fn_a(); SELECT public.fn_b()", "two selects"),
    (
        "SELECT public.fn_a() /* */; DELETE FROM t",
        "comment hides a statement",
    ),
    (
        "SELECT public.fn_a() /* ; */ ; DELETE FROM t",
        "comment with semicolon",
    ),
    (
        "WITH d AS (DELETE FROM t RETURNING 1) SELECT public.fn_a()",
        "CTE with DML",
    ),
    ("WITH x AS (SELECT 1) SELECT public.fn_a()", "CTE"),
    ("SELECT public.fn_c()", "function outside targets"),
    ("SELECT fn_a()", "unqualified (search_path hijack)"),
    ("SELECT pg_temp.fn_a()", "other schema"),
    ("SELECT other.fn_a()", "other schema 2"),
    (
        "SELECT public.fn_a(set_config('role', 'postgres', false))",
        "set_config",
    ),
    (
        "SELECT set_config('search_path', 'pg_temp', false)",
        "set_config alone",
    ),
    ("SELECT dblink('host=x', 'DROP TABLE t')", "dblink"),
    (
        "SELECT public.fn_a(pg_read_file('/etc/passwd'))",
        "pg_read_file",
    ),
    ("SELECT pg_sleep(10)", "pg_sleep"),
    ("SELECT public.fn_a() FROM pg_shadow", "table read"),
    (
        "SELECT public.fn_a() WHERE (SELECT count(*) FROM t) > 0",
        "where sub-query",
    ),
    (
        "SELECT public.fn_a((SELECT passwd FROM pg_shadow LIMIT 1))",
        "sub-query argument",
    ),
    ("SELECT public.fn_a() FOR UPDATE", "locking"),
    ("SELECT public.fn_a() INTO t2", "select into"),
    (
        "SELECT public.fn_a() UNION SELECT public.fn_b()",
        "set operation",
    ),
    ("SELECT public.fn_a()::regclass", "cast to regclass"),
    ("SELECT public.fn_a('x'::text[])", "array cast"),
    ("SELECT 1", "no call"),
    ("SELECT U&\"\\0066n_c\"()", "unicode escape names fn_c"),
    (
        "SELECT public.U&\"fn\\005fc\"()",
        "unicode escape qualified fn_c",
    ),
    ("SELECT public.fn_a(count(*))", "aggregate"),
    ("SELECT public.fn_a() OVER ()", "window"),
    ("\\! touch /tmp/x", "psql meta-command"),
    (
        "SELECT public.fn_a(\n\\! touch /tmp/x\n)",
        "meta-command inside",
    ),
    ("EXPLAIN ANALYZE SELECT public.fn_a()", "explain"),
    ("CALL public.fn_a()", "call"),
    (
        "DO $$ BEGIN EXECUTE 'DROP TABLE t'; END $$",
        "dynamic execute",
    ),
    ("DO $$ BEGIN DELETE FROM t; END $$", "DML in DO"),
    (
        "DO $$ BEGIN PERFORM public.fn_c(); END $$",
        "DO with other function",
    ),
    (
        "DO $$ BEGIN PERFORM set_config('role','x',false); END $$",
        "DO set_config",
    ),
    (
        "DO $$ DECLARE x int := (SELECT count(*) FROM t); BEGIN PERFORM public.fn_a(); END $$",
        "DO declare sub-query",
    ),
    (
        "DO LANGUAGE plperlu $$ system('touch /tmp/x') $$",
        "DO other language",
    ),
    (
        "DO $$ BEGIN PERFORM public.fn_a(); COMMIT; END $$",
        "DO commit",
    ),
    ("DO $$ BEGIN NULL; END $$", "DO without call"),
];

#[test]
fn guard_accepts_governed_calls() {
    for (sql, kind) in ACCEPTED {
        assert_eq!(
            check_statement(sql, &targets()),
            Ok(*kind),
            "should accept: {sql}"
        );
    }
}

#[test]
fn guard_refuses_everything_else() {
    assert!(ACCEPTED.len() + REFUSED.len() >= 40);
    for (sql, why) in REFUSED {
        let r = check_statement(sql, &targets());
        assert!(r.is_err(), "should refuse ({why}): {sql} -> {r:?}");
    }
}

#[test]
fn guard_errors_name_the_reason() {
    assert_eq!(
        check_statement("SELECT public.fn_a(); SELECT 1", &targets()),
        Err(GuardError::StatementCount(2))
    );
    assert!(matches!(
        check_statement("DELETE FROM t", &targets()),
        Err(GuardError::StatementKind(_))
    ));
    assert_eq!(
        check_statement("SELECT public.fn_c()", &targets()),
        Err(GuardError::Function("public.fn_c".into()))
    );
    assert_eq!(
        check_statement("DO $$ BEGIN EXECUTE 'x'; END $$", &targets()),
        Err(GuardError::DynamicExecute)
    );
}
