//! The source tree's shape, checked: no module of a crate imports a module that imports
//! it back (directly or through others). A circle means two files that cannot be read,
//! changed or tested one without the other; the fix is to move what both need to a
//! third file below them.
//!
//! A module is a file (`a/b.rs` is `a::b`, `a/mod.rs` is `a`). Its imports are the
//! `crate::…` paths, the `use crate::{…}` groups and the `super::…` paths of its code
//! outside comments and its `#[cfg(test)] mod tests`. A parent's `mod child;` is not an
//! import: a folder's `mod.rs` lists its parts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `src`, by module path (`""` for the crate root).
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(src).unwrap().with_extension("");
                let mut parts: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                if matches!(
                    parts.last().map(String::as_str),
                    Some("mod" | "lib" | "main")
                ) {
                    parts.pop();
                }
                out.insert(parts.join("::"), path);
            }
        }
    }
    out
}

/// The code of a file without its comments and its unit tests.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The paths (`a::b::C`) that follow `prefix` in `code`.
fn paths_after<'a>(code: &'a str, prefix: &str) -> Vec<&'a str> {
    code.match_indices(prefix)
        .filter(|(at, _)| {
            // a whole word: not `mycrate::`
            !code[..*at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphanumeric() || c == '_')
        })
        .map(|(at, _)| {
            let rest = &code[at + prefix.len()..];
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(rest.len());
            rest[..end].trim_end_matches(':')
        })
        .collect()
}

/// The longest known module a path starts with.
fn module_of(path: &str, known: &BTreeMap<String, PathBuf>) -> Option<String> {
    let parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
    (1..=parts.len())
        .rev()
        .map(|n| parts[..n].join("::"))
        .find(|m| known.contains_key(m))
}

fn imports(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let known = modules(src);
    let mut graph = BTreeMap::new();
    for (module, file) in &known {
        let code = code(&std::fs::read_to_string(file).unwrap());
        let mut deps = BTreeSet::new();
        let mut paths: Vec<String> = paths_after(&code, "crate::")
            .into_iter()
            .map(str::to_string)
            .collect();
        for group in code.split("use crate::{").skip(1) {
            let inner = group.split('}').next().unwrap_or("");
            paths.extend(inner.split(',').map(|p| p.trim().to_string()));
        }
        // `super::x` from `a::b` (a file) is `a::x`; from `a` (a mod.rs) it is the parent's.
        let parent: Vec<&str> = {
            let mut p: Vec<&str> = module.split("::").filter(|p| !p.is_empty()).collect();
            p.pop();
            p
        };
        for rest in paths_after(&code, "super::") {
            let mut full = parent.clone();
            full.extend(rest.split("::"));
            paths.push(full.join("::"));
        }
        for path in paths {
            if let Some(dep) = module_of(&path, &known) {
                if &dep != module {
                    deps.insert(dep);
                }
            }
        }
        graph.insert(module.clone(), deps);
    }
    graph
}

/// The circles of a graph: its strongly connected parts of more than one module.
fn circles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Two modules are in one circle when each reaches the other.
    let reach = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_string()];
        while let Some(m) = todo.pop() {
            for d in graph.get(&m).into_iter().flatten() {
                if seen.insert(d.clone()) {
                    todo.push(d.clone());
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<&String, BTreeSet<String>> =
        graph.keys().map(|m| (m, reach(m))).collect();
    let mut out: Vec<Vec<String>> = Vec::new();
    for m in graph.keys() {
        if out.iter().any(|c| c.contains(m)) {
            continue;
        }
        let circle: Vec<String> = graph
            .keys()
            .filter(|o| *o == m || (reaches[m].contains(*o) && reaches[o].contains(m)))
            .cloned()
            .collect();
        if circle.len() > 1 {
            out.push(circle);
        }
    }
    out
}

fn crate_src(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(name)
        .join("src")
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    for krate in ["shared", "worker", "coordinator"] {
        let graph = imports(&crate_src(krate));
        assert!(graph.len() > 5, "{krate}: found only {:?}", graph.keys());
        let found = circles(&graph);
        assert!(
            found.is_empty(),
            "{krate}/src has import circles (each list imports itself back): {found:?}"
        );
    }
}

#[test]
fn the_checker_finds_a_circle_through_a_folder() {
    // Proves the test above can fail: a/mod.rs uses a::b, b uses c, c uses super (a).
    let dir = std::env::temp_dir().join(format!("mft-layout-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("a")).unwrap();
    std::fs::write(dir.join("lib.rs"), "pub mod a;\n").unwrap();
    std::fs::write(dir.join("a/mod.rs"), "use crate::a::b::X;\n").unwrap();
    std::fs::write(dir.join("a/b.rs"), "use crate::{a::c, other};\n").unwrap();
    std::fs::write(
        dir.join("a/c.rs"),
        "// crate::a::b in a comment\nfn f() { super::thing(); }\n",
    )
    .unwrap();
    let graph = imports(&dir);
    assert_eq!(
        circles(&graph),
        vec![vec!["a".to_string(), "a::b".into(), "a::c".into()]]
    );
    std::fs::write(dir.join("a/c.rs"), "// super::thing in a comment\n").unwrap();
    assert!(circles(&imports(&dir)).is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}
