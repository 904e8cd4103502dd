//! The substrate wing's layering, checked on the source: nothing under
//! `activities/src/substrate/` knows about Temporal or reaches into the activities around it,
//! and the `process` and `qemu` substrates do not import each other (what they share is in
//! `substrate/vm_dir.rs`).

use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

fn substrate_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/substrate")
}

/// The lines of `text` that mention `needle`, with their numbers, for the failure message.
fn lines_with(text: &str, needle: impl Fn(&str) -> bool) -> Vec<String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| needle(l))
        .map(|(i, l)| format!("{}: {}", i + 1, l.trim()))
        .collect()
}

#[test]
fn the_substrate_wing_does_not_know_temporal_or_the_activities() {
    let files = rust_files(&substrate_dir());
    assert!(
        files.len() >= 8,
        "the substrate wing has its files: {files:?}"
    );
    let mut wrong = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read source");
        for line in lines_with(&text, |l| l.contains("temporalio")) {
            wrong.push(format!("{}:{line} (Temporal)", file.display()));
        }
        let outside = |l: &str| {
            l.match_indices("crate::")
                .any(|(i, _)| !l[i + "crate::".len()..].starts_with("substrate"))
        };
        for line in lines_with(&text, outside) {
            wrong.push(format!(
                "{}:{line} (a crate module outside substrate)",
                file.display()
            ));
        }
    }
    assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));
}

#[test]
fn process_and_qemu_do_not_import_each_other() {
    let dir = substrate_dir();
    let mut wrong = Vec::new();
    let process = dir.join("process.rs");
    let text = std::fs::read_to_string(&process).expect("read process.rs");
    let imports_qemu = |l: &str| l.contains("super::qemu") || l.contains("substrate::qemu");
    for line in lines_with(&text, imports_qemu) {
        wrong.push(format!("{}:{line}", process.display()));
    }
    for file in rust_files(&dir.join("qemu")) {
        let text = std::fs::read_to_string(&file).expect("read source");
        let imports_process = |l: &str| {
            l.contains("super::process")
                || l.contains("super::super::process")
                || l.contains("substrate::process")
        };
        for line in lines_with(&text, imports_process) {
            wrong.push(format!("{}:{line}", file.display()));
        }
    }
    assert!(
        wrong.is_empty(),
        "process and qemu import each other:\n{}",
        wrong.join("\n")
    );
}
