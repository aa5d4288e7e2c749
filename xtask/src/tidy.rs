//! Checks on the tree's shape that no compiler enforces, run by `cargo xtask test` before
//! the build. Each one is an architecture invariant written in ARCHITECTURE.md.

use anyhow::Context as _;

use crate::util::cargo;

/// Crates that put video, desktops or SSH into a binary: the cloud receiver must link none.
const STREAMING_CRATES: &[&str] = &[
    "ironrdp", "openh264", "vpx", "webrtc", "rtc", "ssh2", "wgpu", "nvml",
];

/// Runs every check; the error names each broken invariant.
pub(crate) fn check() -> anyhow::Result<()> {
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
    fn finds_streaming_crates_and_nothing_that_only_looks_alike() {
        let tree = "labrack-cloud v0.1.0 (/w/cloud-receiver)\nquinn v0.11.12\nironrdp-pdu v0.11.0\nrtcp-like v1.0.0\nrtc v0.21.1\nvpx-encode v0.6.2\nironrdp-pdu v0.11.0 (*)\nsshkeys v1.0.0\n";
        assert_eq!(
            streaming_crates_in(tree),
            vec!["ironrdp-pdu", "rtc", "vpx-encode"]
        );
        assert!(streaming_crates_in("axum v0.8.9\nrusqlite v0.37.0\n").is_empty());
    }
}
