//! The runtime's layering, checked from its source: the import graph between its files has no
//! cycle, the primitives import only primitives, and no part imports the files that compose it.
//! docs/ARCHITECTURE.md draws the same picture; this test keeps the picture true.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Files that compose or use the parts; no part may import them.
const ABOVE_THE_PARTS: [&str; 7] = [
    "agent.rs",
    "export.rs",
    "handle.rs",
    "health.rs",
    "runtime.rs",
    "source.rs",
    "worker.rs",
];

/// The bottom layer: each may import only others of this list.
const PRIMITIVES: [&str; 13] = [
    "bound.rs",
    "error.rs",
    "gather.rs",
    "ids.rs",
    "limit.rs",
    "mailq.rs",
    "phase.rs",
    "priority.rs",
    "queue.rs",
    "signal.rs",
    "task.rs",
    "telemetry.rs",
    "trace.rs",
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The file a module path (segments after `crate::`) lands in, taking the longest prefix that
/// is a file: `sandbox::model::Lane` is `sandbox/model.rs`, `pool::Pool` is `pool/mod.rs`.
fn resolve(segments: &[&str], known: &BTreeSet<String>) -> Option<String> {
    for n in (1..=segments.len()).rev() {
        let base = segments[..n].join("/");
        for candidate in [format!("{base}.rs"), format!("{base}/mod.rs")] {
            if known.contains(&candidate) {
                return Some(candidate);
            }
        }
    }
    None
}

/// Module paths named in `text`: `crate::a::b`, `super::a` and, in a `mod.rs`, `child::x`.
fn imports(file: &str, text: &str, known: &BTreeSet<String>) -> BTreeSet<String> {
    let dir = Path::new(file)
        .parent()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let is_mod = file.ends_with("mod.rs") || file == "lib.rs";
    let mut out = BTreeSet::new();
    let code: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let words = code.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'));
    for word in words {
        let segs: Vec<&str> = word.split("::").filter(|s| !s.is_empty()).collect();
        if segs.len() < 2 {
            continue;
        }
        let path: Vec<&str> = match segs[0] {
            "crate" => segs[1..].to_vec(),
            "super" if !dir.is_empty() => {
                let parent: Vec<&str> = if is_mod {
                    Path::new(&dir)
                        .parent()
                        .map(|p| p.to_str().unwrap_or("").split('/').collect())
                        .unwrap_or_default()
                } else {
                    dir.split('/').collect()
                };
                parent
                    .into_iter()
                    .filter(|s| !s.is_empty())
                    .chain(segs[1..].iter().copied())
                    .collect()
            }
            first if is_mod => {
                let base: Vec<&str> = if file == "lib.rs" {
                    Vec::new()
                } else {
                    dir.split('/').collect()
                };
                let child = base
                    .iter()
                    .copied()
                    .chain([first])
                    .collect::<Vec<_>>()
                    .join("/");
                if !known.contains(&format!("{child}.rs"))
                    && !known.contains(&format!("{child}/mod.rs"))
                {
                    continue;
                }
                base.into_iter().chain(segs.iter().copied()).collect()
            }
            _ => continue,
        };
        if let Some(target) = resolve(&path, known) {
            if target != file {
                out.insert(target);
            }
        }
    }
    out
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let root = src();
    let mut paths = Vec::new();
    files(&root, &mut paths);
    let known: BTreeSet<String> = paths
        .iter()
        .map(|p| {
            p.strip_prefix(&root)
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    known
        .iter()
        .filter(|f| *f != "lib.rs")
        .map(|f| {
            let text = std::fs::read_to_string(root.join(f)).unwrap();
            (f.clone(), imports(f, &text, &known))
        })
        .collect()
}

#[test]
fn the_import_graph_between_runtime_files_has_no_cycle() {
    let g = graph();
    assert!(g.len() > 20, "the source was read: {g:?}");
    // Depth-first search for a back edge, reporting the cycle it closes.
    fn visit<'a>(
        n: &'a str,
        g: &'a BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) {
        if done.contains(n) {
            return;
        }
        if let Some(i) = stack.iter().position(|s| *s == n) {
            panic!("import cycle: {}", stack[i..].join(" -> ") + " -> " + n);
        }
        stack.push(n);
        for m in g.get(n).into_iter().flatten() {
            visit(m, g, stack, done);
        }
        stack.pop();
        done.insert(n);
    }
    let mut done = BTreeSet::new();
    for n in g.keys() {
        visit(n, &g, &mut Vec::new(), &mut done);
    }
}

#[test]
fn primitives_import_only_primitives() {
    for (file, deps) in graph() {
        if PRIMITIVES.contains(&file.as_str()) {
            for d in deps {
                assert!(
                    PRIMITIVES.contains(&d.as_str()),
                    "{file} is a primitive but imports {d}"
                );
            }
        }
    }
}

#[test]
fn no_part_imports_what_composes_it() {
    for (file, deps) in graph() {
        if ABOVE_THE_PARTS.contains(&file.as_str()) || file == "sandbox/worker.rs" {
            continue;
        }
        // The sandbox's public face re-exports the worker-process side, which sits above the
        // runtime; nothing inside the crate imports that face.
        if file == "sandbox/mod.rs" {
            continue;
        }
        for d in deps {
            assert!(
                !ABOVE_THE_PARTS.contains(&d.as_str()),
                "{file} imports {d}, which sits above the parts"
            );
        }
    }
}

#[test]
fn nothing_inside_the_crate_imports_the_sandboxs_public_face() {
    for (file, deps) in graph() {
        assert!(
            !deps.contains("sandbox/mod.rs"),
            "{file} imports sandbox/mod.rs; import sandbox::model / jobs / lanes instead"
        );
    }
}
