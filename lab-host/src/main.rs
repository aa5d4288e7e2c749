//! `labrack-host`: the agent on each lab machine. It enrols once with a one-time token,
//! then pulls typed tasks from the appliance, runs each at most once, spools results and
//! telemetry while the appliance is unreachable, and makes lab desktops (`local-user`).

mod agent;
mod client;
mod identity;
mod isolation;
mod nvml_ids;
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
    /// Run the agent: pull and run tasks, send heartbeats with telemetry, keep every lab's
    /// box up.
    Run {
        #[arg(long, env = "LABRACK_HOST_STATE_DIR", default_value_os_t = agent::default_state_dir().to_path_buf())]
        state_dir: PathBuf,
        /// the host ports labs get, two each (RDP, then SSH), forwarded into each lab's box
        #[arg(long, default_value = "42000-42999", value_parser = parse_port_range)]
        lab_ports: (u16, u16),
        /// the address the labs' ports listen on
        #[arg(long, default_value = "0.0.0.0")]
        lab_listen: String,
        /// the private IPv4 network labs' links to the host are carved from (a /30 each)
        #[arg(long, default_value = "100.64.0.0/16")]
        lab_network: isolation::net::LabNetwork,
        /// template skeletons must live below this directory (root's, writable by nobody else)
        #[arg(long, default_value = runtime::homes::DEFAULT_SKELETON_ROOT)]
        skeleton_root: PathBuf,
        /// prefix of the Linux users made for labs
        #[arg(long, default_value = "lr-")]
        user_prefix: String,
        /// the SSH host key (private; its `.pub` beside it) every lab's sshd presents; the
        /// appliance pins it
        #[arg(long, default_value = "/etc/ssh/ssh_host_ed25519_key")]
        ssh_host_key_file: PathBuf,
        /// the TLS certificate (PEM) every lab's xrdp presents; the appliance pins it
        #[arg(long, default_value = "/etc/xrdp/cert.pem")]
        rdp_cert_file: PathBuf,
        /// the certificate's private key
        #[arg(long, default_value = "/etc/xrdp/key.pem")]
        rdp_key_file: PathBuf,
        /// how many checks may run at once (each is sandboxed and time-limited)
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
        check_concurrency: u16,
        /// how many NVIDIA GPUs (/dev/nvidia0 …) labs may be given [default: every GPU NVML sees]
        #[arg(long, value_parser = clap::value_parser!(u32).range(0..=64))]
        gpus: Option<u32>,
    },
    /// Remove every lab this host holds (boxes, users, homes): decommissioning a host.
    ClearLabs {
        #[arg(long, env = "LABRACK_HOST_STATE_DIR", default_value_os_t = agent::default_state_dir().to_path_buf())]
        state_dir: PathBuf,
    },
    /// (internal) The supervisor of one lab's box.
    #[command(hide = true)]
    LabBox {
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long)]
        lab: String,
    },
    /// (internal) PID 1 of a lab's box.
    #[command(hide = true)]
    LabInit {
        #[arg(long)]
        spec: PathBuf,
    },
    /// (internal) A check's sandbox, outside its PID namespace; the run's spec on stdin.
    #[command(hide = true)]
    CheckExec,
    /// (internal) PID 1 of a check's PID namespace.
    #[command(hide = true)]
    CheckInit,
    /// Print one telemetry sample (CPU, memory, disks, NVIDIA GPUs) as JSON.
    Telemetry {
        /// CPU use is measured over this many milliseconds
        #[arg(long, default_value_t = 500)]
        interval_ms: u64,
    },
}

/// `START-END`, two ports per lab.
fn parse_port_range(text: &str) -> Result<(u16, u16), String> {
    let (first, last) = text
        .split_once('-')
        .ok_or("write FIRST-LAST, e.g. 42000-42999")?;
    let first: u16 = first
        .trim()
        .parse()
        .map_err(|_| format!("{first:?} is not a port"))?;
    let last: u16 = last
        .trim()
        .parse()
        .map_err(|_| format!("{last:?} is not a port"))?;
    if first == 0 || last <= first {
        return Err("the range must hold at least two ports, the first above 0".into());
    }
    Ok((first, last))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The sandboxes' own exit codes pass through unchanged.
    match cli.command {
        Command::CheckExec => return finish(isolation::sandbox::exec()),
        Command::CheckInit => return finish(isolation::sandbox::init()),
        _ => {}
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("labrack-host: error: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn finish(result: anyhow::Result<ExitCode>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("labrack-host: error: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LABRACK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Telemetry { interval_ms } => {
            let resources = runtime::host_resources(
                &isolation::cgroup::Cgroups::detect()?,
                &isolation::gpus::GpuInventory::discover(),
            );
            println!(
                "{}",
                serde_json::to_string_pretty(&telemetry::sample(
                    Duration::from_millis(interval_ms),
                    resources,
                    &[],
                    |_| None
                ))?
            );
            Ok(())
        }
        Command::Enrol {
            appliance,
            token,
            ca,
            name,
            address,
            capacity,
            state_dir,
            force,
        } => {
            init_logging();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let options = agent::EnrolOptions {
                appliance,
                token,
                ca,
                name,
                address,
                capacity,
                state_dir: state_dir.clone(),
                force,
            };
            let config = runtime.block_on(agent::enrol(options))?;
            println!(
                "labrack-host: enrolled as host {} ({}) with {}",
                config.host_id, config.name, config.appliance
            );
            println!(
                "labrack-host: identity saved in {}; start it with `labrack-host run`",
                state_dir.display()
            );
            Ok(())
        }
        Command::Run {
            state_dir,
            lab_ports,
            lab_listen,
            lab_network,
            skeleton_root,
            user_prefix,
            ssh_host_key_file,
            rdp_cert_file,
            rdp_key_file,
            check_concurrency,
            gpus,
        } => {
            init_logging();
            runtime::accounts::check_prefix(&user_prefix)?;
            let public_key_file = ssh_host_key_file.with_extension("pub");
            let ssh_host_key = match std::fs::read_to_string(&public_key_file) {
                Ok(line) => Some(line.trim().to_owned()),
                Err(error) => {
                    tracing::warn!(file = %public_key_file.display(), %error, "no SSH host key to report: browser terminals will be refused");
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
            let pause_in_task = std::env::var("LABRACK_HOST_TEST_PAUSE_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .map(Duration::from_millis);
            let host_table = format!(
                "labrack_{}",
                &hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
                    state_dir.display().to_string().as_bytes()
                ))[..8]
            );
            let boxes = isolation::BoxSettings {
                state_dir: state_dir.clone(),
                listen: lab_listen,
                lab_network: lab_network.to_string(),
                host_table,
                ssh_host_key: ssh_host_key_file,
                rdp_cert: rdp_cert_file,
                rdp_key: rdp_key_file,
            };
            let options = agent::RunOptions {
                runtime: runtime::RuntimeSettings {
                    state_dir: state_dir.clone(),
                    user_prefix,
                    skeleton_root,
                    first_port: lab_ports.0,
                    last_port: lab_ports.1,
                    lab_network,
                    ssh_host_key,
                    rdp_cert_sha256,
                    cgroups: isolation::cgroup::Cgroups::detect()?,
                    gpus: gpus.map_or_else(
                        isolation::gpus::GpuInventory::discover,
                        isolation::gpus::GpuInventory::counted,
                    ),
                },
                boxes,
                state_dir,
                pause_in_task,
                check_concurrency: usize::from(check_concurrency),
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(agent::run(options))
        }
        Command::ClearLabs { state_dir } => {
            init_logging();
            let removed = agent::clear_labs(&state_dir)?;
            println!("labrack-host: removed {removed} lab(s)");
            Ok(())
        }
        Command::LabBox { state_dir, lab } => {
            init_logging();
            isolation::supervisor::run(&state_dir, &lab)
        }
        Command::LabInit { spec } => isolation::init::run(&spec),
        Command::CheckExec | Command::CheckInit => Ok(()),
    }
}

/// SHA-256 (hex) of the first certificate in a PEM file.
fn certificate_sha256(path: &std::path::Path) -> anyhow::Result<String> {
    use anyhow::Context as _;
    use sha2::Digest as _;
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let der = rustls_pemfile::certs(&mut pem.as_slice())
        .next()
        .context("no certificate in the file")??;
    Ok(hex::encode(sha2::Sha256::digest(der.as_ref())))
}
