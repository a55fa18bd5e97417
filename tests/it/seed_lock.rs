//! The committed catalog seed (sql/seed/catalog.sql) is locked to
//! config/catalog.toml: regenerate it with `govsql catalog seed-sql`.

use crate::harness::{catalog_path, shipped_catalog_path};

#[test]
fn committed_seed_matches_the_catalog() {
    let catalog = govsql::catalog::Catalog::load(&shipped_catalog_path()).unwrap();
    let seed_path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sql/seed/catalog.sql");
    let committed = std::fs::read_to_string(&seed_path).unwrap();
    for c in catalog.commands() {
        let line = committed
            .lines()
            .skip_while(|l| !l.contains("INSERT INTO public.dot_iu_command_catalog"))
            .find(|l| {
                l.trim_start()
                    .starts_with(&format!("VALUES ('{}',", c.name))
            })
            .unwrap_or_else(|| panic!("{} missing from the committed seed", c.name));
        assert!(
            line.contains(&format!("'{}', ", c.category)),
            "{}: category",
            c.name
        );
        let flags = format!("{}, {}, ", c.mutating, c.reversible);
        assert!(line.contains(&flags), "{}: mutating/reversible", c.name);
        match &c.inverse {
            Some(inv) => assert!(line.contains(&format!("'{inv}'")), "{}: inverse", c.name),
            None => assert!(line.contains(", NULL, "), "{}: no inverse", c.name),
        }
    }
    assert_eq!(
        committed,
        catalog.seed_sql(),
        "sql/seed/catalog.sql is stale: run `govsql catalog seed-sql > sql/seed/catalog.sql`"
    );
}

#[test]
fn shipped_catalog_has_the_contract_entries() {
    let catalog = govsql::catalog::Catalog::load(&shipped_catalog_path()).unwrap();
    // The production catalog ships no test-only drills; the test catalog
    // has them.
    assert!(
        catalog.commands().iter().all(|c| !c.name.contains("diag")),
        "config/catalog.toml ships a diag command"
    );
    let test = govsql::catalog::Catalog::load(&catalog_path()).unwrap();
    assert!(test.get("dot_iu_diag_sleep").is_ok());
    assert!(catalog.commands().len() >= 12);
    let expect = [
        ("dot_iu_healthcheck", "fn_iu_collection_healthcheck", vec![]),
        (
            "dot_iu_collection_validate",
            "fn_iu_collection_validate",
            vec!["collection_id"],
        ),
        (
            "dot_iu_create_collection",
            "fn_iu_collection_create",
            vec!["title"],
        ),
        (
            "dot_iu_archive_collection",
            "fn_iu_collection_archive",
            vec!["collection_id"],
        ),
        (
            "dot_iu_add_piece",
            "fn_iu_add_piece",
            vec!["collection_id", "body"],
        ),
        (
            "dot_iu_delete_piece_soft",
            "fn_iu_delete_piece_soft",
            vec!["piece_id"],
        ),
        (
            "dot_iu_restore_piece",
            "fn_iu_restore_piece",
            vec!["piece_id"],
        ),
        ("dot_iu_piece_get", "fn_iu_piece_get", vec!["piece_id"]),
    ];
    for (name, target, params) in expect {
        let c = catalog.get(name).unwrap();
        assert_eq!(c.targets, vec![target.to_string()], "{name}");
        let names: Vec<&str> = c.params.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, params, "{name}");
    }
    let reversible_pairs = catalog
        .commands()
        .iter()
        .filter(|c| {
            c.inverse
                .as_deref()
                .is_some_and(|i| catalog.get(i).unwrap().inverse.as_deref() == Some(&c.name))
        })
        .count();
    assert!(reversible_pairs >= 6, "at least three reversible pairs");
    assert!(catalog
        .commands()
        .iter()
        .any(|c| c.mutating && !c.reversible));
    assert!(catalog.commands().iter().any(|c| c.requires_approval));
}
