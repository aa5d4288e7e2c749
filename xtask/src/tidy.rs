//! Checks on the tree's shape that no compiler enforces, run by `cargo xtask test` before
//! the build. Each one is an architecture invariant written in ARCHITECTURE.md.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::util::{cargo, project_root};

/// Crates that put video, desktops or SSH into a binary: the cloud receiver must link none.
const STREAMING_CRATES: &[&str] = &[
    "ironrdp", "openh264", "vpx", "webrtc", "rtc", "ssh2", "wgpu", "nvml",
];

/// Names only the appliance's HTTP layer (`appliance/src/http/`) may use: the web framework,
/// its state and the layer itself. The binary's edge (`main.rs`, `cli.rs`) starts the server.
const HTTP_ONLY_NAMES: &[&str] = &["axum", "AppState", "crate::http", "labrack::http"];
const HTTP_EDGE_FILES: &[&str] = &["main.rs", "cli.rs"];

/// Calls that read the wall clock; each server crate has one module that may.
const WALL_CLOCK_READS: &[&str] = &[
    "SystemTime::now",
    "OffsetDateTime::now_utc",
    "OffsetDateTime::now_local",
    "Utc::now",
    "Local::now",
];
/// (crate source dir, its clock module)
const CLOCK_MODULES: &[(&str, &str)] = &[
    ("appliance/src", "clock.rs"),
    ("cloud-receiver/src", "clock.rs"),
];

/// Runs every check; the error names each broken invariant.
pub(crate) fn check() -> anyhow::Result<()> {
    check_sources()?;
    cloud_links_no_streaming_code()
}

/// The layering and clock invariants, read from the sources.
fn check_sources() -> anyhow::Result<()> {
    let mut broken = Vec::new();
    let root = project_root();
    let appliance = root.join("appliance/src");
    for file in rust_files(&appliance)? {
        let relative = file.strip_prefix(&appliance).unwrap_or(&file);
        if relative.starts_with("http")
            || HTTP_EDGE_FILES
                .iter()
                .any(|edge| relative == Path::new(edge))
        {
            continue;
        }
        let text = std::fs::read_to_string(&file)?;
        for (line, name) in names_used(&text, HTTP_ONLY_NAMES) {
            broken.push(format!(
                "appliance/src/{}:{line}: names `{name}`, which only the HTTP layer (appliance/src/http/) may: \
                 give the domain its own type, or move the code into http/",
                relative.display()
            ));
        }
    }
    for (dir, clock) in CLOCK_MODULES {
        let source = root.join(dir);
        for file in rust_files(&source)? {
            let relative = file.strip_prefix(&source).unwrap_or(&file);
            if relative == Path::new(clock) {
                continue;
            }
            let text = std::fs::read_to_string(&file)?;
            for (line, name) in names_used(&text, WALL_CLOCK_READS) {
                broken.push(format!(
                    "{dir}/{}:{line}: reads the wall clock (`{name}`); only {dir}/{clock} may: call it",
                    relative.display()
                ));
            }
        }
    }
    anyhow::ensure!(
        broken.is_empty(),
        "{} architecture invariant(s) broken (see ARCHITECTURE.md):\n  {}",
        broken.len(),
        broken.join("\n  ")
    );
    Ok(())
}

/// Every `.rs` file under `dir`, sorted.
fn rust_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        for entry in
            std::fs::read_dir(&next).with_context(|| format!("reading {}", next.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                found.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

/// (line number, name) for each of `names` used in `text` as a whole word or path, outside
/// `//` comments.
fn names_used<'a>(text: &str, names: &[&'a str]) -> Vec<(usize, &'a str)> {
    let mut found = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        for name in names {
            let mut rest = code;
            while let Some(at) = rest.find(name) {
                let before = rest[..at].chars().next_back();
                let after = rest[at + name.len()..].chars().next();
                let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
                if !word(before) && !word(after) {
                    found.push((index + 1, *name));
                    break;
                }
                rest = &rest[at + name.len()..];
            }
        }
    }
    found
}

/// The cloud receiver's dependency tree holds no streaming crate.
fn cloud_links_no_streaming_code() -> anyhow::Result<()> {
    let output = cargo()
        .args([
            "tree",
            "-p",
            "labrack-cloud",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .output()
        .context("running cargo tree")?;
    anyhow::ensure!(
        output.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let found = streaming_crates_in(&String::from_utf8_lossy(&output.stdout));
    anyhow::ensure!(
        found.is_empty(),
        "the cloud receiver (labrack-cloud) links streaming code: {}; it must depend only on \
         the wire protocol, the serving plumbing and the shared domain",
        found.join(", ")
    );
    Ok(())
}

/// The packages of a `cargo tree --prefix none --format {p}` listing that are streaming
/// crates (a name equal to one, or starting with it and a dash).
fn streaming_crates_in(tree: &str) -> Vec<String> {
    let mut found: Vec<String> = tree
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| {
            STREAMING_CRATES.iter().any(|banned| {
                *name == *banned
                    || name
                        .strip_prefix(banned)
                        .is_some_and(|rest| rest.starts_with('-'))
            })
        })
        .map(str::to_owned)
        .collect();
    found.sort();
    found.dedup();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_names_as_words_outside_comments() {
        let text = "use axum::Json;\nlet axumish = 1; // axum here is a comment\nfn f(s: &AppState) {}\nlet x = MyAppState;\n";
        assert_eq!(
            names_used(text, HTTP_ONLY_NAMES),
            vec![(1, "axum"), (3, "AppState")]
        );
        let clock = "let t = std::time::SystemTime::now();\nlet u = time::OffsetDateTime::now_utc();\nlet v = Instant::now();\n";
        assert_eq!(
            names_used(clock, WALL_CLOCK_READS),
            vec![(1, "SystemTime::now"), (2, "OffsetDateTime::now_utc")]
        );
        assert!(names_used("let s = \"a\"; // SystemTime::now\n", WALL_CLOCK_READS).is_empty());
    }

    #[test]
    fn the_tree_keeps_its_invariants() {
        check_sources().expect("the tree keeps the layering and clock invariants");
    }

    #[test]
    fn finds_streaming_crates_and_nothing_that_only_looks_alike() {
        let tree = "labrack-cloud v0.1.0 (/w/cloud-receiver)\nquinn v0.11.12\nironrdp-pdu v0.11.0\nrtcp-like v1.0.0\nrtc v0.21.1\nvpx-encode v0.6.2\nironrdp-pdu v0.11.0 (*)\nsshkeys v1.0.0\n";
        assert_eq!(
            streaming_crates_in(tree),
            vec!["ironrdp-pdu", "rtc", "vpx-encode"]
        );
        assert!(streaming_crates_in("axum v0.8.9\nrusqlite v0.37.0\n").is_empty());
    }
}
