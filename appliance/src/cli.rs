//! Command line: `labrack serve`, `labrack admin …`. Settings come from flags, then
//! `LABRACK_*` environment variables, then a TOML config file (`--config`), then defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;

#[derive(Debug, Parser)]
#[command(
    name = "labrack",
    version,
    about = "LabRack edge appliance for on-site hackathons and lab events"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the appliance: control plane, API and web UI.
    Serve(Box<ServeArgs>),
    /// Administrative tasks on a data directory.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Moved: the central cloud is its own program, `labrack-cloud`.
    #[command(hide = true, disable_help_flag = true)]
    Cloud {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Give a staff account a new one-time password (printed) and end its sessions.
    ResetPassword {
        /// the staff account's username
        username: String,
        #[arg(long, env = "LABRACK_DATA_DIR", default_value = "./data")]
        data_dir: PathBuf,
    },
    /// Print the API's OpenAPI document (what `GET /api/openapi.json` serves) on stdout.
    #[command(name = "openapi")]
    OpenApi,
    /// Log in to a lab's desktop over RDP as the streamer does and report what it shows.
    ProbeDesktop {
        /// the allocation id
        allocation: i64,
        #[arg(long, env = "LABRACK_DATA_DIR", default_value = "./data")]
        data_dir: PathBuf,
        #[arg(long, env = "LABRACK_SECRET_KEY_FILE")]
        secret_key_file: Option<PathBuf>,
        /// watch the desktop at most this many seconds
        #[arg(long, default_value_t = 20)]
        watch_secs: u64,
        /// succeed as soon as this colour (RRGGBB) covers a quarter of the screen; fail if it never does
        #[arg(long)]
        expect_rgb: Option<String>,
        /// write what the desktop showed as a PPM image
        #[arg(long)]
        ppm: Option<PathBuf>,
        /// also run the streaming pipeline (RDP → I420 → H.264) this many seconds and report on it
        #[arg(long)]
        stream_secs: Option<u64>,
        /// the desktop size to ask the RDP server for, WIDTHxHEIGHT
        #[arg(long, default_value = "1024x768", value_parser = crate::probe::parse_size)]
        size: (u16, u16),
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// one JSON object per line (default)
    Json,
    /// human-readable lines
    Text,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML file with any of: data_dir, listen, dev_http, web_dir, tls_names, mdns, log_format, secret_key_file, host_heartbeat_secs, host_grace_secs,
    /// webrtc_bind, check_workers, job_attempts (a table of kind = attempts), llm_endpoints (a list of
    /// {url, model, api_key_env}), llm_team_budget, llm_requests_per_minute, llm_allow_remote,
    /// observer_secs, idle_minutes, max_connections, max_connections_per_client, header_timeout_secs, idle_timeout_secs
    #[arg(long, env = "LABRACK_CONFIG")]
    pub config: Option<PathBuf>,
    /// where the database and TLS material live [default: ./data]
    #[arg(long, env = "LABRACK_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// address to listen on [default: 0.0.0.0:8443]; port 0 picks a free port
    #[arg(long, env = "LABRACK_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// serve plain HTTP instead of HTTPS (development only: cookies lose `Secure`)
    #[arg(long, env = "LABRACK_DEV_HTTP")]
    pub dev_http: bool,
    /// directory of the built web UI [default: ./web/dist]
    #[arg(long, env = "LABRACK_WEB_DIR")]
    pub web_dir: Option<PathBuf>,
    /// extra DNS names or IP addresses for the server certificate (comma-separated)
    #[arg(long, env = "LABRACK_TLS_NAMES", value_delimiter = ',')]
    pub tls_names: Vec<String>,
    /// do not announce the appliance on the LAN over mDNS (`_labrack._tcp`), which lets staff
    /// consoles find it; it is never announced while listening on loopback only
    #[arg(long, env = "LABRACK_NO_MDNS")]
    pub no_mdns: bool,
    /// log format [default: json]
    #[arg(long, env = "LABRACK_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// the 32-byte key that seals lab credentials at rest [default: DATA_DIR/secret.key]
    #[arg(long, env = "LABRACK_SECRET_KEY_FILE")]
    pub secret_key_file: Option<PathBuf>,
    /// seconds between lab-host heartbeats; three missed mark a host unhealthy [default: 5]
    #[arg(long, env = "LABRACK_HOST_HEARTBEAT_SECS")]
    pub host_heartbeat_secs: Option<u64>,
    /// how long the labs of a silent host wait for it (unreachable) before they fail and staff
    /// decide; nothing is removed either way [default: 900]
    #[arg(long, env = "LABRACK_HOST_GRACE_SECS")]
    pub host_grace_secs: Option<u64>,
    /// where desktop viewers' WebRTC UDP sockets bind [default: 0.0.0.0:0, one per LAN interface]
    #[arg(long, env = "LABRACK_WEBRTC_BIND")]
    pub webrtc_bind: Option<String>,
    /// how many queue jobs (checks over SSH, scoring, hint answers) the appliance works on at
    /// once; a check a lab host's agent runs holds no slot while it runs [default: 16]
    #[arg(long, env = "LABRACK_CHECK_WORKERS")]
    pub check_workers: Option<usize>,
    /// attempts a job kind gets before it is a dead letter, e.g. `run_check=3` (repeatable;
    /// default 5 for every kind)
    #[arg(long = "job-attempts", value_name = "KIND=N")]
    pub job_attempts: Vec<String>,
    /// an OpenAI-compatible endpoint for the agents (repeatable: tried in order); none: the
    /// agents use their rules
    #[arg(
        long = "llm-endpoint",
        value_name = "URL",
        env = "LABRACK_LLM_ENDPOINTS",
        value_delimiter = ','
    )]
    pub llm_endpoints: Vec<String>,
    /// the model to ask for at every endpoint [default: default]
    #[arg(long, env = "LABRACK_LLM_MODEL")]
    pub llm_model: Option<String>,
    /// the environment variable that holds the endpoints' API key (never the key itself)
    #[arg(long, env = "LABRACK_LLM_API_KEY_ENV")]
    pub llm_api_key_env: Option<String>,
    /// tokens each team may use in all [default: 50000]
    #[arg(long, env = "LABRACK_LLM_TEAM_BUDGET")]
    pub llm_team_budget: Option<u64>,
    /// AI requests a team may make per minute [default: 6]
    #[arg(long, env = "LABRACK_LLM_REQUESTS_PER_MINUTE")]
    pub llm_requests_per_minute: Option<u32>,
    /// allow endpoints outside the venue's network (team data leaves the venue)
    #[arg(long, env = "LABRACK_LLM_ALLOW_REMOTE")]
    pub llm_allow_remote: bool,
    /// seconds between live-observer passes [default: 60]
    #[arg(long, env = "LABRACK_OBSERVER_SECS")]
    pub observer_secs: Option<u64>,
    /// minutes without activity before a lab counts as idle [default: 30]
    #[arg(long, env = "LABRACK_IDLE_MINUTES")]
    pub idle_minutes: Option<u64>,
    /// what one GPU-hour of an active lab costs in the billing ledger, in cents [default: 100]
    #[arg(long, env = "LABRACK_GPU_HOUR_RATE_CENTS")]
    pub gpu_hour_rate_cents: Option<u32>,
    /// what 1,000 LLM tokens cost in the billing ledger, in cents [default: 0]
    #[arg(long, env = "LABRACK_LLM_RATE_CENTS_PER_1K_TOKENS")]
    pub llm_rate_cents_per_1k_tokens: Option<u32>,
    /// how often an active lab's usage becomes a ledger entry, in seconds [default: 900]
    #[arg(long, env = "LABRACK_BILLING_WINDOW_SECS")]
    pub billing_window_secs: Option<u64>,
    /// `host:port` of `labrack cloud`'s sync listener; without it nothing is synced
    #[arg(long, env = "LABRACK_CLOUD")]
    pub cloud: Option<String>,
    /// the cloud's CA certificate (PEM), the only one the sync link trusts
    #[arg(long, env = "LABRACK_CLOUD_CA")]
    pub cloud_ca: Option<PathBuf>,
    /// a one-time enrolment token from `labrack cloud enrol-token` (needed once)
    #[arg(long, env = "LABRACK_CLOUD_TOKEN")]
    pub cloud_token: Option<String>,
    /// this appliance's name in the cloud [default: the host name]
    #[arg(long, env = "LABRACK_CLOUD_NAME")]
    pub cloud_name: Option<String>,
    /// seconds acknowledged outbox rows are kept before pruning [default: 3600]
    #[arg(long, env = "LABRACK_OUTBOX_RETENTION_SECS")]
    pub outbox_retention_secs: Option<u64>,
    /// connections held at once, in all; 1/16 of them is kept for lab hosts (lowered to
    /// fit the open-file limit) [default: 4096]
    #[arg(long, env = "LABRACK_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// connections held at once from one client (an IPv6 client by its /64) [default: 64]
    #[arg(long, env = "LABRACK_MAX_CONNECTIONS_PER_CLIENT")]
    pub max_connections_per_client: Option<usize>,
    /// seconds a new connection may take for its TLS handshake and its first request
    /// [default: 10]
    #[arg(long, env = "LABRACK_HEADER_TIMEOUT_SECS")]
    pub header_timeout_secs: Option<u64>,
    /// seconds a kept-alive connection may wait for (and take to send the headers of) its
    /// next request; longer than clients keep idle connections (90 s for most libraries),
    /// so they close first and never send into a connection being closed [default: 120]
    #[arg(long, env = "LABRACK_IDLE_TIMEOUT_SECS")]
    pub idle_timeout_secs: Option<u64>,
}

/// The config file's shape: every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    data_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
    dev_http: Option<bool>,
    web_dir: Option<PathBuf>,
    tls_names: Option<Vec<String>>,
    mdns: Option<bool>,
    log_format: Option<LogFormat>,
    secret_key_file: Option<PathBuf>,
    host_heartbeat_secs: Option<u64>,
    host_grace_secs: Option<u64>,
    webrtc_bind: Option<String>,
    check_workers: Option<usize>,
    job_attempts: Option<std::collections::HashMap<String, u32>>,
    llm_endpoints: Option<Vec<crate::llm::LlmEndpoint>>,
    llm_team_budget: Option<u64>,
    llm_requests_per_minute: Option<u32>,
    llm_allow_remote: Option<bool>,
    observer_secs: Option<u64>,
    idle_minutes: Option<u64>,
    gpu_hour_rate_cents: Option<u32>,
    llm_rate_cents_per_1k_tokens: Option<u32>,
    billing_window_secs: Option<u64>,
    cloud: Option<String>,
    cloud_ca: Option<PathBuf>,
    cloud_name: Option<String>,
    outbox_retention_secs: Option<u64>,
    max_connections: Option<usize>,
    max_connections_per_client: Option<usize>,
    header_timeout_secs: Option<u64>,
    idle_timeout_secs: Option<u64>,
}

/// Fully resolved settings for `labrack serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub dev_http: bool,
    pub web_dir: PathBuf,
    pub tls_names: Vec<String>,
    /// announce on the LAN over mDNS
    pub mdns: bool,
    pub log_format: LogFormat,
    pub secret_key_file: PathBuf,
    pub host_heartbeat_secs: u64,
    pub host_grace_secs: u64,
    pub webrtc_bind: String,
    pub queue: crate::checks::QueueSettings,
    pub llm: crate::llm::LlmSettings,
    pub billing: crate::billing::BillingSettings,
    pub sync: Option<crate::sync::relay::SyncSettings>,
    pub observer_every: std::time::Duration,
    pub idle_after: std::time::Duration,
    pub connections: crate::http::connections::ConnectionLimits,
    /// for a new connection's TLS handshake and first request
    pub header_timeout: std::time::Duration,
    /// for a kept-alive connection's next request
    pub idle_timeout: std::time::Duration,
}

impl ServeArgs {
    pub fn resolve(self) -> anyhow::Result<ServeConfig> {
        let file = match &self.config {
            Some(path) => load_config_file(path)?,
            None => ConfigFile::default(),
        };
        let data_dir = self
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("./data"));
        let host_heartbeat_secs = self
            .host_heartbeat_secs
            .or(file.host_heartbeat_secs)
            .unwrap_or(5);
        anyhow::ensure!(
            (1..=300).contains(&host_heartbeat_secs),
            "host_heartbeat_secs must be between 1 and 300"
        );
        let host_grace_secs = self.host_grace_secs.or(file.host_grace_secs).unwrap_or(900);
        anyhow::ensure!(
            (1..=86_400).contains(&host_grace_secs),
            "host_grace_secs must be between 1 and 86400"
        );
        let check_workers = self.check_workers.or(file.check_workers).unwrap_or(16);
        anyhow::ensure!(
            (1..=256).contains(&check_workers),
            "check_workers must be between 1 and 256"
        );
        let mut max_attempts = file.job_attempts.unwrap_or_default();
        for pair in &self.job_attempts {
            let (kind, n) = pair
                .split_once('=')
                .with_context(|| format!("--job-attempts {pair:?}: expected KIND=N"))?;
            let n: u32 = n
                .parse()
                .with_context(|| format!("--job-attempts {pair:?}: N must be a number"))?;
            max_attempts.insert(kind.trim().to_owned(), n);
        }
        for (kind, n) in &max_attempts {
            anyhow::ensure!(
                (1..=100).contains(n),
                "job attempts for {kind:?} must be between 1 and 100 (got {n})"
            );
        }
        let endpoints = if self.llm_endpoints.is_empty() {
            file.llm_endpoints.unwrap_or_default()
        } else {
            let model = self.llm_model.clone().unwrap_or_else(|| "default".into());
            self.llm_endpoints
                .iter()
                .map(|url| crate::llm::LlmEndpoint {
                    url: url.trim().to_owned(),
                    model: model.clone(),
                    api_key_env: self.llm_api_key_env.clone(),
                })
                .collect()
        };
        crate::llm::check_policy(
            &endpoints,
            self.llm_allow_remote || file.llm_allow_remote.unwrap_or(false),
        )
        .map_err(anyhow::Error::msg)?;
        let llm = crate::llm::LlmSettings {
            endpoints,
            team_token_budget: self
                .llm_team_budget
                .or(file.llm_team_budget)
                .unwrap_or(50_000),
            requests_per_minute: self
                .llm_requests_per_minute
                .or(file.llm_requests_per_minute)
                .unwrap_or(6),
            cents_per_1k_tokens: self
                .llm_rate_cents_per_1k_tokens
                .or(file.llm_rate_cents_per_1k_tokens)
                .unwrap_or(0),
        };
        let billing_window_secs = self
            .billing_window_secs
            .or(file.billing_window_secs)
            .unwrap_or(900);
        anyhow::ensure!(
            (10..=86_400).contains(&billing_window_secs),
            "billing_window_secs must be between 10 and 86400"
        );
        let billing = crate::billing::BillingSettings {
            gpu_hour_cents: self
                .gpu_hour_rate_cents
                .or(file.gpu_hour_rate_cents)
                .unwrap_or(100),
            llm_1k_tokens_cents: llm.cents_per_1k_tokens,
            window: std::time::Duration::from_secs(billing_window_secs),
        };
        anyhow::ensure!(
            llm.requests_per_minute >= 1,
            "llm_requests_per_minute must be at least 1"
        );
        let observer_secs = self.observer_secs.or(file.observer_secs).unwrap_or(60);
        anyhow::ensure!(
            (1..=3600).contains(&observer_secs),
            "observer_secs must be between 1 and 3600"
        );
        let idle_minutes = self.idle_minutes.or(file.idle_minutes).unwrap_or(30);
        anyhow::ensure!(
            (1..=1440).contains(&idle_minutes),
            "idle_minutes must be between 1 and 1440"
        );
        let sync = match self.cloud.clone().or(file.cloud) {
            None => None,
            Some(cloud) => {
                let cloud_ca = self
                    .cloud_ca
                    .clone()
                    .or(file.cloud_ca)
                    .context("--cloud needs --cloud-ca (the cloud's CA certificate)")?;
                anyhow::ensure!(cloud.contains(':'), "--cloud must be host:port");
                let name = self
                    .cloud_name
                    .clone()
                    .or(file.cloud_name)
                    .unwrap_or_else(|| {
                        std::fs::read_to_string("/etc/hostname")
                            .map(|h| h.trim().to_owned())
                            .unwrap_or_else(|_| "appliance".into())
                    });
                Some(crate::sync::relay::SyncSettings {
                    cloud,
                    cloud_ca,
                    token: self.cloud_token.clone(),
                    name,
                    batch_rows: 2000,
                    retention: std::time::Duration::from_secs(
                        self.outbox_retention_secs
                            .or(file.outbox_retention_secs)
                            .unwrap_or(3600),
                    ),
                })
            }
        };
        let max_connections = self
            .max_connections
            .or(file.max_connections)
            .unwrap_or(4_096);
        anyhow::ensure!(
            (64..=1_000_000).contains(&max_connections),
            "max_connections must be between 64 and 1000000"
        );
        let per_client = self
            .max_connections_per_client
            .or(file.max_connections_per_client)
            .unwrap_or(64);
        anyhow::ensure!(
            (1..=max_connections).contains(&per_client),
            "max_connections_per_client must be between 1 and max_connections"
        );
        let header_timeout_secs = self
            .header_timeout_secs
            .or(file.header_timeout_secs)
            .unwrap_or(10);
        anyhow::ensure!(
            (1..=600).contains(&header_timeout_secs),
            "header_timeout_secs must be between 1 and 600"
        );
        let idle_timeout_secs = self
            .idle_timeout_secs
            .or(file.idle_timeout_secs)
            .unwrap_or(120);
        anyhow::ensure!(
            (header_timeout_secs..=3600).contains(&idle_timeout_secs),
            "idle_timeout_secs must be between header_timeout_secs and 3600"
        );
        Ok(ServeConfig {
            connections: crate::http::connections::ConnectionLimits {
                max: max_connections,
                per_client,
                reserved_for_hosts: max_connections / 16,
            },
            header_timeout: std::time::Duration::from_secs(header_timeout_secs),
            idle_timeout: std::time::Duration::from_secs(idle_timeout_secs),
            sync,
            billing,
            llm,
            observer_every: std::time::Duration::from_secs(observer_secs),
            idle_after: std::time::Duration::from_secs(idle_minutes * 60),
            queue: crate::checks::QueueSettings {
                max_attempts,
                check_workers,
            },
            secret_key_file: self
                .secret_key_file
                .or(file.secret_key_file)
                .unwrap_or_else(|| data_dir.join("secret.key")),
            host_heartbeat_secs,
            host_grace_secs,
            webrtc_bind: self
                .webrtc_bind
                .or(file.webrtc_bind)
                .unwrap_or_else(|| "0.0.0.0:0".into()),
            data_dir,
            listen: self
                .listen
                .or(file.listen)
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8443))),
            dev_http: self.dev_http || file.dev_http.unwrap_or(false),
            web_dir: self
                .web_dir
                .or(file.web_dir)
                .unwrap_or_else(|| PathBuf::from("./web/dist")),
            tls_names: if self.tls_names.is_empty() {
                file.tls_names.unwrap_or_default()
            } else {
                self.tls_names
            },
            mdns: !self.no_mdns && file.mdns.unwrap_or(true),
            log_format: self
                .log_format
                .or(file.log_format)
                .unwrap_or(LogFormat::Json),
        })
    }
}

fn load_config_file(path: &Path) -> anyhow::Result<ConfigFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("config file {}", path.display()))
}

/// `labrack cloud …` from before the cloud had its own binary: say where it went.
fn moved_cloud(args: &[String]) -> anyhow::Error {
    anyhow::anyhow!(
        "the central cloud is its own program now: run `labrack-cloud {}` (the same arguments; \
         it is built beside `labrack`)",
        args.join(" ")
    )
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => crate::http::serve::serve(args.resolve()?),
        Command::Cloud { args } => Err(moved_cloud(&args)),
        Command::Admin(AdminCommand::ResetPassword { username, data_dir }) => {
            let password = crate::http::serve::reset_password(&data_dir, &username)?;
            println!("labrack: one-time password for {username}: {password}");
            println!("(it must be changed at the next login)");
            Ok(())
        }
        Command::Admin(AdminCommand::OpenApi) => {
            let document = serde_json::to_string_pretty(&crate::http::openapi::model())?;
            println!("{document}");
            Ok(())
        }
        Command::Admin(AdminCommand::ProbeDesktop {
            allocation,
            data_dir,
            secret_key_file,
            watch_secs,
            expect_rgb,
            ppm,
            stream_secs,
            size,
        }) => {
            let expect_rgb = expect_rgb
                .as_deref()
                .map(crate::probe::parse_rgb)
                .transpose()?;
            let options = crate::probe::ProbeOptions {
                data_dir,
                secret_key_file,
                allocation,
                watch: std::time::Duration::from_secs(watch_secs),
                expect_rgb,
                ppm,
                stream: stream_secs.map(std::time::Duration::from_secs),
                size,
            };
            println!("{}", crate::probe::probe(&options)?);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_old_cloud_subcommand_points_to_labrack_cloud() {
        let cli = Cli::try_parse_from([
            "labrack",
            "cloud",
            "enrol-token",
            "--data-dir",
            "/srv/cloud",
        ])
        .expect("still parses");
        let error = run(cli).expect_err("refused");
        assert!(
            error
                .to_string()
                .contains("run `labrack-cloud enrol-token --data-dir /srv/cloud`"),
            "{error}"
        );
    }

    #[test]
    fn flags_beat_file_and_file_beats_defaults() {
        let dir = std::env::temp_dir().join(format!("labrack-cfg-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("labrack.toml");
        std::fs::write(
            &path,
            "data_dir = \"/srv/labrack\"\nlisten = \"127.0.0.1:9000\"\nlog_format = \"text\"\n",
        )
        .expect("write");
        let cli = Cli::try_parse_from([
            "labrack",
            "serve",
            "--config",
            path.to_str().expect("utf8"),
            "--listen",
            "127.0.0.1:9001",
        ])
        .expect("parse");
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        let config = args.resolve().expect("resolve");
        assert_eq!(config.data_dir, PathBuf::from("/srv/labrack"));
        assert_eq!(
            config.listen,
            "127.0.0.1:9001".parse::<SocketAddr>().expect("addr")
        );
        assert_eq!(config.log_format, LogFormat::Text);
        assert!(!config.dev_http);
        std::fs::write(&path, "colour = \"blue\"\n").expect("write");
        let cli =
            Cli::try_parse_from(["labrack", "serve", "--config", path.to_str().expect("utf8")])
                .expect("parse");
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        let error = args.resolve().expect_err("unknown key refused");
        assert!(format!("{error:#}").contains("colour"), "{error:#}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
