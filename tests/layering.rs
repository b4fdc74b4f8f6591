//! The daemon's module map stays a map (issue 25): the top-level modules of
//! src/ import one another without a cycle, and the dialects in api/ import the
//! shared request, error and core modules, never each other. Read from the
//! sources (test modules left out), so a new upward import fails here, named.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// A file's code without its `#[cfg(test)]` module (always the last item here).
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

/// The names after each `prefix` in `text` (`crate::` → `api`, `supervisor`, ...).
fn names_after(text: &str, prefix: &str) -> BTreeSet<String> {
    text.match_indices(prefix)
        .map(|(at, _)| {
            text[at + prefix.len()..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect::<String>()
        })
        .filter(|n| !n.is_empty())
        .collect()
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Top-level module → the top-level modules it uses.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let root = src();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&root).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if top == "lib" || top == "main" {
            continue;
        }
        let deps = names_after(&code(&f), "crate::");
        let entry = graph.entry(top.clone()).or_default();
        entry.extend(deps.into_iter().filter(|d| *d != top));
    }
    let known: BTreeSet<String> = graph.keys().cloned().collect();
    for deps in graph.values_mut() {
        deps.retain(|d| known.contains(d));
    }
    graph
}

/// A cycle through `start`, if any (depth-first).
fn cycle_from(
    graph: &BTreeMap<String, BTreeSet<String>>,
    start: &str,
    at: &str,
    path: &mut Vec<String>,
) -> Option<Vec<String>> {
    for next in &graph[at] {
        if next == start {
            let mut cycle = path.clone();
            cycle.push(start.to_string());
            return Some(cycle);
        }
        if !path.contains(next) {
            path.push(next.clone());
            if let Some(c) = cycle_from(graph, start, next, path) {
                return Some(c);
            }
            path.pop();
        }
    }
    None
}

#[test]
fn the_top_level_modules_import_each_other_without_a_cycle() {
    let graph = module_graph();
    assert!(graph.len() >= 10, "the scan found the modules: {graph:?}");
    assert!(
        graph["serve"].contains("api"),
        "the scan reads imports: {graph:?}"
    );
    for start in graph.keys() {
        let mut path = vec![start.clone()];
        if let Some(cycle) = cycle_from(&graph, start, start, &mut path) {
            panic!("an import cycle: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn dialects_import_the_shared_modules_never_each_other() {
    let dialects = ["openai", "responses", "anthropic", "ollama"];
    for d in dialects {
        let text = code(&src().join("api").join(format!("{d}.rs")));
        let used = names_after(&text, "super::");
        for other in dialects.iter().filter(|o| **o != d) {
            assert!(!used.contains(*other), "api/{d}.rs imports api/{other}.rs");
        }
        assert!(
            used.contains("request") && used.contains("core"),
            "api/{d}.rs: {used:?}"
        );
    }
}
