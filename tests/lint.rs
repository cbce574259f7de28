//! `cleanroom queries lint`, run as a user would: clean on the committed allow-list, and on broken
//! files a non-zero exit with one `file:line: reason` per problem.

use std::process::Command;

use crate::util::root;

pub(crate) fn lint(queries: &std::path::Path) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_cleanroom"))
        .current_dir(root())
        .args([
            "queries",
            "lint",
            "--rules",
            "sample_data/rules.toml",
            "--queries",
        ])
        .arg(queries)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[test]
fn the_committed_allow_list_is_clean() {
    let (ok, out) = lint(&root().join("queries"));
    assert!(ok, "{out}");
    assert!(out.contains("5 queries checked, no problem found"), "{out}");
}

#[test]
fn broken_queries_are_reported_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = crate::util::read(&root().join("queries/matched_overlap.toml"));
    let write = |id: &str, text: String| {
        std::fs::write(
            dir.path().join(format!("{id}.toml")),
            text.replace("matched_overlap", id),
        )
        .unwrap()
    };
    write("matched_overlap", good.clone());
    // The guard refuses it: member_key in the output.
    write(
        "leaks_keys",
        good.replace(
            "SELECT m.partner_attribute,",
            "SELECT m.member_key AS partner_attribute,",
        )
        .replace("GROUP BY m.partner_attribute", "GROUP BY m.member_key"),
    );
    // Metadata: k below the floor of 10.
    write("low_k", good.replace("k = 10", "k = 3"));
    // Not TOML at all on line 2.
    write("not_toml", "id = \"not_toml\"\nversion = = 1\n".to_string());

    let (ok, out) = lint(dir.path());
    assert!(!ok, "lint must fail:\n{out}");
    let line_of = |needle: &str| {
        good.replace("matched_overlap", "x")
            .lines()
            .position(|l| l.starts_with(needle))
            .unwrap()
            + 1
    };
    let expect = [
        (
            "leaks_keys.toml",
            line_of("sql"),
            "member_key may not group the output",
        ),
        ("low_k.toml", line_of("k ="), "k 3 is below the floor 10"),
        ("not_toml.toml", 2, "column 11: extra `=`"),
    ];
    for (file, line, reason) in expect {
        let found = out
            .lines()
            .any(|l| l.contains(&format!("{file}:{line}:")) && l.contains(reason));
        assert!(found, "no `{file}:{line}: …{reason}` in:\n{out}");
    }
    assert!(
        !out.contains("matched_overlap.toml:"),
        "the good file is not reported:\n{out}"
    );
}
