//! `labrack-host`: the agent on each lab machine. It enrols once with a one-time token,
//! then pulls typed tasks from the appliance, runs each at most once, spools results and
//! telemetry while the appliance is unreachable, and makes lab desktops (`local-user`).

mod agent;
mod client;
mod identity;
mod runtime;
mod spool;
mod telemetry;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "labrack-host", version, about = "LabRack lab-host agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Enrol this machine with an appliance using a one-time token from the staff UI.
    Enrol {
        /// the appliance, e.g. https://10.0.0.1:8443
        #[arg(long)]
        appliance: String,
        /// the one-time enrolment token
        #[arg(long, env = "LABRACK_ENROL_TOKEN")]
        token: String,
        /// the appliance's CA certificate (data/tls/ca.pem on the appliance)
        #[arg(long)]
        ca: PathBuf,
        /// this host's name in the inventory [default: the hostname]
        #[arg(long)]
        name: Option<String>,
        /// where the appliance reaches this host's RDP and SSH servers [default: the local address towards the appliance]
        #[arg(long)]
        address: Option<String>,
        /// how many labs this host may run at once
        #[arg(long, default_value_t = 4)]
        capacity: u32,
        #[arg(long, env = "LABRACK_HOST_STATE_DIR", default_value_os_t = agent::default_state_dir().to_path_buf())]
        state_dir: PathBuf,
        /// enrol again even though this state dir holds an identity
        #[arg(long)]
        force: bool,
    },
    /// Run the agent: pull and run tasks, send heartbeats with telemetry.
    Run {
        #[arg(long, env = "LABRACK_HOST_STATE_DIR", default_value_os_t = agent::default_state_dir().to_path_buf())]
        state_dir: PathBuf,
        /// the port of this host's RDP server (xrdp)
        #[arg(long, default_value_t = 3389)]
        rdp_port: u16,
        /// the port of this host's SSH server
        #[arg(long, default_value_t = 22)]
        ssh_port: u16,
        /// prefix of the Linux users made for labs
        #[arg(long, default_value = "lr-")]
        user_prefix: String,
        /// the SSH server's public host key, reported to the appliance for verification
        #[arg(long, default_value = "/etc/ssh/ssh_host_ed25519_key.pub")]
        ssh_host_key_file: PathBuf,
        /// the RDP server's TLS certificate (PEM), whose fingerprint the appliance pins
        #[arg(long, default_value = "/etc/xrdp/cert.pem")]
        rdp_cert_file: PathBuf,
        /// how many checks may run at once (each is sandboxed and time-limited)
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
        check_concurrency: u16,
    },
    /// Print one telemetry sample (CPU, memory, disks, NVIDIA GPUs) as JSON.
    Telemetry {
        /// CPU use is measured over this many milliseconds
        #[arg(long, default_value_t = 500)]
        interval_ms: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("labrack-host: error: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LABRACK_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Telemetry { interval_ms } => {
            println!("{}", serde_json::to_string_pretty(&telemetry::sample(Duration::from_millis(interval_ms)))?);
            Ok(())
        }
        Command::Enrol { appliance, token, ca, name, address, capacity, state_dir, force } => {
            init_logging();
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let options = agent::EnrolOptions { appliance, token, ca, name, address, capacity, state_dir: state_dir.clone(), force };
            let config = runtime.block_on(agent::enrol(options))?;
            println!("labrack-host: enrolled as host {} ({}) with {}", config.host_id, config.name, config.appliance);
            println!("labrack-host: identity saved in {}; start it with `labrack-host run`", state_dir.display());
            Ok(())
        }
        Command::Run { state_dir, rdp_port, ssh_port, user_prefix, ssh_host_key_file, rdp_cert_file, check_concurrency } => {
            init_logging();
            runtime::local_user::check_prefix(&user_prefix)?;
            let ssh_host_key = match std::fs::read_to_string(&ssh_host_key_file) {
                Ok(line) => Some(line.trim().to_owned()),
                Err(error) => {
                    tracing::warn!(file = %ssh_host_key_file.display(), %error, "no SSH host key to report: browser terminals will be refused");
                    None
                }
            };
            let rdp_cert_sha256 = match certificate_sha256(&rdp_cert_file) {
                Ok(digest) => Some(digest),
                Err(error) => {
                    tracing::warn!(file = %rdp_cert_file.display(), error = %format!("{error:#}"), "no RDP certificate to report: desktops cannot be streamed");
                    None
                }
            };
            // Fault injection for the restart tests; undocumented for operators on purpose.
            let pause_in_task = std::env::var("LABRACK_HOST_TEST_PAUSE_MS").ok().and_then(|v| v.parse().ok()).map(Duration::from_millis);
            let options = agent::RunOptions {
                state_dir,
                runtime: runtime::RuntimeSettings { user_prefix, rdp_port, ssh_port, ssh_host_key, rdp_cert_sha256 },
                pause_in_task,
                check_concurrency: usize::from(check_concurrency),
            };
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            runtime.block_on(agent::run(options))
        }
    }
}

/// SHA-256 (hex) of the first certificate in a PEM file.
fn certificate_sha256(path: &std::path::Path) -> anyhow::Result<String> {
    use anyhow::Context as _;
    use sha2::Digest as _;
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let der = rustls_pemfile::certs(&mut pem.as_slice()).next().context("no certificate in the file")??;
    Ok(hex::encode(sha2::Sha256::digest(der.as_ref())))
}
