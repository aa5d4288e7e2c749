//! `cargo xtask fuzz`: coverage-guided fuzzing (cargo fuzz, libFuzzer with AddressSanitizer)
//! of every parser a stranger, a team or a peer can feed (`fuzz/fuzz_targets/`).
//!
//! - `cargo xtask fuzz [--seconds N] [TARGET…]` runs each target (all by default) for N s
//!   (default 300) and keeps what it finds new in `fuzz/corpus/TARGET/` (commit it).
//! - `cargo xtask test` runs each for [`TEST_SECONDS`] with the committed corpus read-only, so
//!   a run never changes the checkout.
//!
//! A crash stops the run with the input's path (`fuzz/artifacts/TARGET/`); turn it into a
//! regression test beside the parser before fixing it.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::util::{project_root, run, step};

/// Every fuzz target, one per parser.
pub(crate) const TARGETS: &[&str] = &[
    "roster_csv",
    "template_toml",
    "rubric_toml",
    "host_protocol",
    "sync_frames",
    "desktop_messages",
    "desktop_input",
    "terminal_messages",
    "sdp_offer",
];
/// How long `cargo xtask test` fuzzes each target.
pub(crate) const TEST_SECONDS: u64 = 20;

fn fuzz_dir() -> PathBuf {
    project_root().join("fuzz")
}

fn target_dir() -> PathBuf {
    crate::util::target_dir().with_file_name("fuzz-target")
}

/// cargo fuzz needs a nightly toolchain (its sanitizer flags); it and cargo-fuzz are checked
/// and cargo-fuzz installed (once) here, with a clear error when nightly is missing.
pub(crate) fn ensure_tools() -> anyhow::Result<()> {
    let nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output();
    if !nightly.is_ok_and(|o| o.status.success()) {
        bail!(
            "fuzzing needs Rust's nightly toolchain (cargo fuzz builds with sanitizers): run `rustup toolchain install nightly`"
        );
    }
    let installed = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .output();
    if installed.is_ok_and(|o| o.status.success()) {
        return Ok(());
    }
    step("installing cargo-fuzz (once)");
    run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
}

/// Builds every target (release, AddressSanitizer) in a target dir of its own.
fn build() -> anyhow::Result<()> {
    step("building the fuzz targets (cargo +nightly fuzz build)");
    run(Command::new("cargo")
        .current_dir(fuzz_dir())
        .env("CARGO_TARGET_DIR", target_dir())
        .args(["+nightly", "fuzz", "build", "--release"]))
    .context("building the fuzz targets")
}

/// Runs `target` for `seconds`; new finds go to `corpus` (the repo's corpus is read as well).
fn run_target(target: &str, seconds: u64, corpus: &std::path::Path) -> anyhow::Result<()> {
    let committed = fuzz_dir().join("corpus").join(target);
    std::fs::create_dir_all(corpus)?;
    let mut command = Command::new("cargo");
    command
        .current_dir(fuzz_dir())
        .env("CARGO_TARGET_DIR", target_dir())
        .args(["+nightly", "fuzz", "run", "--release", target])
        .arg(corpus);
    if corpus != committed {
        command.arg(&committed);
    }
    command.args([
        "--",
        &format!("-max_total_time={seconds}"),
        "-max_len=65536",
        "-rss_limit_mb=2048",
        "-timeout=10",
        "-print_final_stats=1",
    ]);
    run(&mut command).with_context(|| {
        format!("fuzz target {target} found a crash (see fuzz/artifacts/{target}/)")
    })
}

/// `cargo xtask fuzz [--seconds N] [TARGET…]`.
pub(crate) fn cmd_fuzz(args: &[String]) -> anyhow::Result<()> {
    let mut seconds = 300;
    let mut chosen = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => {
                seconds = args
                    .next()
                    .context("--seconds needs a number")?
                    .parse()
                    .context("--seconds must be a number")?
            }
            name if TARGETS.contains(&name) => chosen.push(name.to_owned()),
            other => bail!(
                "unknown fuzz target or option {other:?}; targets: {}",
                TARGETS.join(", ")
            ),
        }
    }
    if chosen.is_empty() {
        chosen = TARGETS.iter().map(|t| (*t).to_owned()).collect();
    }
    ensure_tools()?;
    build()?;
    for target in &chosen {
        step(&format!(
            "fuzzing {target} for {seconds} s (new finds go to fuzz/corpus/{target}/)"
        ));
        run_target(target, seconds, &fuzz_dir().join("corpus").join(target))?;
    }
    Ok(())
}

/// The test command's bounded run: every target for [`TEST_SECONDS`], the repo untouched.
pub(crate) fn test_run() -> anyhow::Result<()> {
    ensure_tools()?;
    build()?;
    let scratch = crate::util::temp_dir("fuzz-corpus")?;
    for target in TARGETS {
        step(&format!("fuzzing {target} for {TEST_SECONDS} s"));
        run_target(target, TEST_SECONDS, &scratch.join(target))?;
    }
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(())
}
