//! `labrack-cloud`: run the central-cloud receiver, or make an enrolment token.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "labrack-cloud",
    version,
    about = "LabRack central cloud: receives appliances' scores and ledgers over QUIC and serves them"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Receive appliances' outboxes over QUIC and serve the read API.
    Serve {
        #[arg(long, env = "LABRACK_CLOUD_DATA_DIR", default_value = "./cloud-data")]
        data_dir: PathBuf,
        /// UDP address of the sync (QUIC) listener
        #[arg(long, env = "LABRACK_CLOUD_LISTEN", default_value = "0.0.0.0:7443")]
        listen: SocketAddr,
        /// TCP address of the HTTPS read API
        #[arg(
            long,
            env = "LABRACK_CLOUD_HTTP_LISTEN",
            default_value = "0.0.0.0:7444"
        )]
        http_listen: SocketAddr,
        /// extra DNS names or IP addresses for the certificate (comma-separated)
        #[arg(long, value_delimiter = ',')]
        tls_names: Vec<String>,
    },
    /// Print a one-time token that enrols one appliance (`labrack serve --cloud-token`).
    EnrolToken {
        #[arg(long, env = "LABRACK_CLOUD_DATA_DIR", default_value = "./cloud-data")]
        data_dir: PathBuf,
        /// how long the token is valid
        #[arg(long, default_value_t = 86_400)]
        ttl_secs: u64,
    },
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            data_dir,
            listen,
            http_listen,
            tls_names,
        } => {
            let filter = tracing_subscriber::EnvFilter::try_from_env("LABRACK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .try_init();
            labrack_cloud::receiver::serve(labrack_cloud::receiver::CloudConfig {
                data_dir,
                listen,
                http_listen,
                tls_names,
            })
        }
        Command::EnrolToken { data_dir, ttl_secs } => {
            println!(
                "{}",
                labrack_cloud::receiver::enrol_token(&data_dir, ttl_secs)?
            );
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("labrack-cloud: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
