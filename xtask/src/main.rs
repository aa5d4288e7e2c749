//! `cargo xtask …`: the developer and CI entry points. CI calls exactly what a developer
//! runs (`.ci/run` → `cargo xtask test`), so the two never drift.

mod api_fuzz;
mod bench;
mod bench_abuse;
mod bench_drill;
mod bench_reset;
mod bench_scoring;
mod bench_stream;
mod bench_sync;
mod cpu_groups;
mod fuzz;
mod tidy;
mod util;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, bail};

use util::{cargo, project_root, run};

const USAGE: &str = "usage: cargo xtask <command>

commands:
  run [ARGS…]       build the web UI and labrack (release) and start `labrack serve`
                    on ./data; extra ARGS go to `labrack serve`
  test              install missing system packages (apt-get), build everything,
                    run every test: Rust (nextest), browser (Chromium), API fuzzing
                    (schemathesis) and parser fuzzing (cargo fuzz)
  test --no-install skip the apt-get step
  bench api         durable-write benchmark against a running release labrack
                    [--requests N] [--concurrency N] [--runs N]
  bench reset       lab reset time end to end (release labrack + labrack-host + xrdp)
  bench stream      desktop streaming: encode cost, glass-to-glass latency, concurrency
  bench scoring     a submission wave (2,000 teams × 10) and check throughput with N workers
                    [--teams N] [--per-team N] [--concurrency N] [--runs N]
                    [--lab-teams N] [--checks N] [--workers 1,2,4,8]
  bench sync        outbox rows over QUIC to labrack-cloud: rows/s, lag, partition catch-up
                    [--rows N] [--runs N] [--partition-secs N] [--write-secs N]
  bench abuse       200 participants and 4 lab hosts at work while strangers flood logins,
                    slow connections, a terminal, a desktop and the public scoreboard
                    [--participants N] [--hosts N] [--phase-secs N] [--logins N]
                    [--slow N] [--streams N]
  bench drill       the power-cut drill: a scripted event while kill -9 hits the appliance,
                    the lab host and the cloud at random; nothing lost, nothing twice
                    [--minutes N] [--kill-every-secs N] [--teams N]
  fuzz [--seconds N] [TARGET…]
                    coverage-guided fuzzing (cargo fuzz, nightly) of every parser strangers
                    and teams can feed, N s per target (300); new finds go to fuzz/corpus/
  api-fuzz [--seconds N]
                    schemathesis against a running debug labrack, as a participant and
                    as the admin, N s each (the test command's step; build first)
  web               refresh the web UI's copy of the API document from the server's code
                    (web/src/generated/openapi.json), regenerate its TypeScript types
                    from it and build the web UI
";

/// Debian packages the test command needs, with the command that shows each is present.
/// What the tests need from Debian: the browser, real sshd for the lab terminal, the RDP
/// servers and X tools for lab desktops (xrdp; freerdp-shadow and weston for the RDP client's
/// compatibility tests), the C toolchain bits ssh2 and OpenH264 build with, and what the Tauri
/// console builds and is tested with (WebKitGTK, its WebDriver, D-Bus and a notification daemon).
const SYSTEM_PACKAGES: &[&str] = &[
    "libwebkit2gtk-4.1-dev",
    "libgtk-3-dev",
    "libayatana-appindicator3-dev",
    "librsvg2-dev",
    "libxdo-dev",
    "webkit2gtk-driver",
    // the console's desktop notifications are tested against a real session bus and daemon
    "dbus",
    "dunst",
    "libglib2.0-bin",
    // drives the console's native file dialogs in its test
    "xdotool",
    // the join-code badges embed these fonts (every script a name may be written in), and
    // their tests read the PDFs back with poppler
    "fonts-dejavu-core",
    "fonts-droid-fallback",
    "poppler-utils",
    "chromium",
    "ca-certificates",
    "openssh-server",
    "xrdp",
    "xorgxrdp",
    "xterm",
    "xclip",
    "libvpx-dev",
    "python3-minimal",
    // tests run small servers and ptrace attempts inside labs with Debian's python3
    "python3",
    // schemathesis (the API fuzzing) runs in a virtual environment of its own
    "python3-venv",
    "util-linux",
    // each lab's box: network namespaces and their rules, disk images, the cron spool it masks
    "iproute2",
    "nftables",
    "e2fsprogs",
    "procps",
    "cron",
    "x11-xserver-utils",
    "dbus-x11",
    "ssl-cert",
    "libssl-dev",
    "pkg-config",
    "nasm",
    "xvfb",
    "freerdp2-shadow-x11",
    "winpr-utils",
    "weston",
    "openssl",
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => cmd_run(&args[1..]),
        Some("test") => cmd_test(&args[1..]),
        Some("bench") => bench::cmd_bench(&args[1..]),
        Some("fuzz") => fuzz::cmd_fuzz(&args[1..]),
        Some("api-fuzz") => api_fuzz::cmd_api_fuzz(&args[1..]),
        Some("web") => cmd_web(),
        Some("-h" | "--help" | "help") | None => {
            print!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(anyhow::anyhow!("unknown command {other:?}\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn cmd_run(extra: &[String]) -> anyhow::Result<()> {
    build_web()?;
    run(cargo().args(["build", "--release", "-p", "labrack"]))?;
    let binary = util::target_dir().join("release/labrack");
    let mut command = std::process::Command::new(binary);
    command
        .current_dir(project_root())
        .args(["serve", "--log-format", "text"])
        .args(extra);
    run(&mut command)
}

fn cmd_test(args: &[String]) -> anyhow::Result<()> {
    let install = !args.iter().any(|a| a == "--no-install");
    if let Some(unknown) = args.iter().find(|a| a.as_str() != "--no-install") {
        bail!("unknown test option {unknown:?}");
    }
    let started = std::time::Instant::now();
    if install {
        util::ensure_debian_packages(SYSTEM_PACKAGES)?;
        util::ensure_node()?;
        util::ensure_nextest()?;
        util::ensure_tauri_driver()?;
        fuzz::ensure_tools()?;
        api_fuzz::ensure_tools()?;
    }
    util::step("formatting (cargo fmt --check)");
    run(cargo().args(["fmt", "--all", "--check"]))
        .context("the tree is not in rustfmt's style: run `cargo fmt --all`")?;
    util::step("architecture invariants (cargo xtask tidy)");
    tidy::check()?;
    build_web()?;
    util::step("building labrack and the test binaries");
    run(cargo().args(["build", "--workspace", "--all-targets"]))?;
    util::step("lints (cargo clippy, warnings are errors)");
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    util::step("Rust tests (cargo nextest)");
    run(cargo()
        .args(["nextest", "run", "--workspace", "--no-fail-fast"])
        .env("LABRACK_BIN", util::target_dir().join("debug/labrack"))
        .env(
            "LABRACK_CONSOLE_BIN",
            util::target_dir().join("debug/labrack-console"),
        )
        .env(
            "LABRACK_SCREENSHOT_DIR",
            util::target_dir().join("screenshots"),
        ))?;
    util::step("browser tests (Debian Chromium, headless)");
    browser_tests()?;
    util::step("API fuzzing: schemathesis against a running labrack serve");
    api_fuzz::test_run()?;
    util::step(&format!(
        "fuzzing: each parser for {} s (cargo fuzz)",
        fuzz::TEST_SECONDS
    ));
    fuzz::test_run()?;
    util::step(&format!(
        "all tests passed in {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// `cargo xtask web`: the document from the server's code, then the types and the build.
fn cmd_web() -> anyhow::Result<()> {
    util::step("the API document (labrack admin openapi)");
    let output = cargo()
        .args(["run", "--quiet", "-p", "labrack", "--", "admin", "openapi"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running labrack admin openapi")?;
    anyhow::ensure!(
        output.status.success(),
        "labrack admin openapi failed ({})",
        output.status
    );
    let copy = project_root().join("web/src/generated/openapi.json");
    std::fs::write(&copy, &output.stdout).with_context(|| format!("writing {}", copy.display()))?;
    println!("xtask: wrote {}", copy.display());
    build_web()
}

/// Builds the web UI: its TypeScript types are generated from the kept copy of the API
/// document (`npm run generate`, part of `npm run build`), then type-checked and bundled.
pub(crate) fn build_web() -> anyhow::Result<()> {
    let web = project_root().join("web");
    util::step("building the web UI");
    let lock = web.join("package-lock.json");
    let stamp = web.join("node_modules/.package-lock.json");
    let fresh = util::modified(&stamp)
        .zip(util::modified(&lock))
        .is_some_and(|(installed, wanted)| installed >= wanted);
    if !fresh {
        run(std::process::Command::new("npm").current_dir(&web).args([
            "ci",
            "--no-audit",
            "--no-fund",
        ]))
        .context("installing the web UI's npm packages")?;
    }
    run(std::process::Command::new("npm")
        .current_dir(&web)
        .args(["run", "build"]))
}

/// Starts a real `labrack serve` on a fresh data dir and runs the Chromium tests against it.
fn browser_tests() -> anyhow::Result<()> {
    let data = util::temp_dir("browser")?;
    let server = util::start_server(&util::target_dir().join("debug/labrack"), &data)?;
    let screenshots: PathBuf = util::target_dir().join("screenshots");
    std::fs::create_dir_all(&screenshots)?;
    let mut node = std::process::Command::new("node");
    node.current_dir(project_root().join("web"))
        .args(["--test", "--test-reporter=spec", "tests/"])
        .env("LABRACK_URL", &server.url)
        .env(
            "LABRACK_CA_FINGERPRINT",
            server.ca_fingerprint.as_deref().unwrap_or_default(),
        )
        .env(
            "LABRACK_ADMIN_PASSWORD",
            server.admin_password.as_deref().unwrap_or_default(),
        )
        .env("LABRACK_SCREENSHOT_DIR", &screenshots);
    let result = run(&mut node);
    let status = server.terminate()?;
    anyhow::ensure!(
        status.success(),
        "labrack exited with {status} after SIGTERM"
    );
    let _ = std::fs::remove_dir_all(&data);
    result?;
    println!("xtask: screenshots in {}", screenshots.display());
    Ok(())
}
