//! The layout of DESIGN.md, checked on the source: dependencies point one
//! way (nothing below the CLI imports it, and no two modules import each
//! other).

use std::collections::BTreeSet;
use std::path::Path;

/// `(module, module it imports)` for every `crate::x` path in src/.
fn edges() -> BTreeSet<(String, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = BTreeSet::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path
                .strip_prefix(&src)
                .unwrap()
                .to_string_lossy()
                .to_string();
            let module = rel
                .split('/')
                .next()
                .unwrap()
                .trim_end_matches(".rs")
                .to_string();
            let text = std::fs::read_to_string(&path).unwrap();
            for (i, _) in text.match_indices("crate::") {
                let used: String = text[i + 7..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                if !used.is_empty() && used != module {
                    out.insert((module.clone(), used));
                }
            }
        }
    }
    out
}

#[test]
fn dependencies_point_one_way() {
    let edges = edges();
    assert!(
        edges.contains(&("runtime".into(), "transport".into())),
        "the scan sees imports"
    );
    for (from, to) in &edges {
        assert_ne!(to, "cli", "{from} imports the CLI");
        assert!(
            !edges.contains(&(to.clone(), from.clone())),
            "{from} and {to} import each other"
        );
    }
}
