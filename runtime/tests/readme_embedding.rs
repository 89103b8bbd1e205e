//! The README's "Embedding Troupe" guide, checked as a user would follow it: a fresh crate with
//! exactly the dependencies the guide lists and its example as `main.rs` must compile. (The
//! example also runs as a doc test of this crate; this test proves the dependency list.)

use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("runtime/ sits in the workspace")
        .to_path_buf()
}

/// The first fenced block of `lang` after `heading` in the README.
fn block_after(readme: &str, heading: &str, lang: &str) -> String {
    let at = readme.find(heading).expect("README has the section");
    let fence = format!("```{lang}\n");
    let start = readme[at..].find(&fence).expect("section has the block") + at + fence.len();
    let len = readme[start..].find("```").expect("block ends");
    readme[start..start + len].to_owned()
}

#[test]
fn the_embedding_example_compiles_with_exactly_the_listed_dependencies() {
    let root = workspace();
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README");
    let deps = block_after(&readme, "## Embedding Troupe", "toml");
    let main = block_after(&readme, "## Embedding Troupe", "rust");
    assert!(deps.starts_with("[dependencies]\n"), "{deps}");
    let listed: Vec<&str> = deps
        .lines()
        .skip(1)
        .filter_map(|l| l.split('=').next())
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .collect();
    assert_eq!(listed, ["troupe", "tokio"], "the guide lists: {deps}");

    let dir = std::env::temp_dir().join(format!("troupe-readme-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("src")).expect("temp crate");
    // The README's path is relative to the repository; the temp crate lives elsewhere.
    let runtime = root.join("runtime").display().to_string();
    let deps = deps.replace("path = \"runtime\"", &format!("path = {runtime:?}"));
    std::fs::write(
        dir.join("Cargo.toml"),
        format!(
            "[package]\nname = \"embedding-guide\"\nversion = \"0.0.0\"\nedition = \"2024\"\n\
             publish = false\n\n[workspace]\n\n{deps}"
        ),
    )
    .expect("manifest");
    std::fs::write(dir.join("src/main.rs"), main).expect("main.rs");
    // Pin versions to the workspace's lock file, so the check needs no network.
    std::fs::copy(root.join("Cargo.lock"), dir.join("Cargo.lock")).expect("lock file");

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["check", "--offline", "--quiet", "--manifest-path"])
        .arg(dir.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", root.join("target/readme-embedding"))
        .env_remove("RUSTFLAGS")
        .output()
        .expect("cargo runs");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "the README's embedding example does not build with its listed dependencies:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
