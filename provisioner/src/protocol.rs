//! Versioned wire types of the appliance↔host task protocol. Hosts pull tasks; each task
//! has an id that is stable across re-deliveries, so a host runs it at most once.

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks; a peer with another major version is refused.
pub const PROTOCOL_VERSION: u32 = 1;

/// Identifies one task: `alloc-{allocation}-{kind}-{n}`, where n counts the tasks issued for
/// the allocation. Re-delivering the same task reuses the id; a retry or a new request
/// (a second reset) gets a new n and so a new id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskId(pub String);

impl TaskId {
    pub fn new(allocation_id: i64, kind: &str, n: u32) -> Self {
        Self(format!("alloc-{allocation_id}-{kind}-{n}"))
    }

    /// A check run's task: `check-{run}-{attempt}` (a retry after a failed delivery or an
    /// unreachable host gets a new id; a re-delivery keeps it).
    pub fn check(check_run_id: i64, attempt: u32) -> Self {
        Self(format!("check-{check_run_id}-{attempt}"))
    }
}

/// What a host is asked to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum TaskKind {
    /// create the allocation's desktop from a template
    Provision { allocation_id: i64, template: String, runtime: String, skeleton: String },
    /// end the session, restore the desktop from the template's skeleton, rotate the password
    Reset { allocation_id: i64, skeleton: String },
    /// remove the desktop and everything it owned
    Release { allocation_id: i64 },
    /// run one of the template's checks against the allocation's lab, sandboxed: as the
    /// lab's user, within `timeout_secs` and `memory_mib`, without network unless allowed
    RunCheck {
        allocation_id: i64,
        check_run_id: i64,
        name: String,
        script: String,
        timeout_secs: u32,
        memory_mib: u32,
        network: bool,
    },
}

impl TaskKind {
    /// Short name used in task ids and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Provision { .. } => "provision",
            Self::Reset { .. } => "reset",
            Self::Release { .. } => "release",
            Self::RunCheck { .. } => "check",
        }
    }
}

/// A task as delivered to a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostTask {
    pub version: u32,
    pub id: TaskId,
    pub host_id: i64,
    pub kind: TaskKind,
}

/// How a task ended, as reported by the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case", deny_unknown_fields)]
pub enum TaskOutcome {
    Succeeded {
        /// how to reach the desktop, after a provision or a reset (which rotates the password)
        #[serde(default, skip_serializing_if = "Option::is_none")]
        desktop: Option<DesktopAccess>,
    },
    Failed { error: String },
    /// a check ran (whether it passed is in the result); `Failed` means it could not run
    Checked { check: crate::check::CheckResult },
}

impl TaskOutcome {
    /// Success without desktop details (release).
    pub fn done() -> Self {
        Self::Succeeded { desktop: None }
    }
}

/// The endpoint and credentials of an allocation's desktop, sent by the host to the
/// appliance only. The appliance stores the password encrypted and never shows it to a
/// browser.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesktopAccess {
    pub username: String,
    pub password: String,
    /// the host's RDP server
    pub rdp_port: u16,
    /// the host's SSH server
    pub ssh_port: u16,
    /// the SSH server's public host key (OpenSSH line), so the appliance can verify it
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_host_key: Option<String>,
    /// SHA-256 (hex) of the RDP server's TLS certificate, so the appliance can pin it
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdp_cert_sha256: Option<String>,
}

impl std::fmt::Debug for DesktopAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DesktopAccess")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("rdp_port", &self.rdp_port)
            .field("ssh_port", &self.ssh_port)
            .field("ssh_host_key", &self.ssh_host_key)
            .field("rdp_cert_sha256", &self.rdp_cert_sha256)
            .finish()
    }
}

/// A host's report of one task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskReport {
    pub version: u32,
    pub id: TaskId,
    pub outcome: TaskOutcome,
}

/// A host's telemetry sample (sent with heartbeats).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Telemetry {
    pub version: u32,
    /// CPU use over the sampling interval, 0–100 (all cores)
    pub cpu_percent: f32,
    pub cpu_count: u32,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
    pub disks: Vec<DiskUsage>,
    pub gpus: GpuTelemetry,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskUsage {
    pub mount_point: String,
    pub total_bytes: u64,
    pub available_bytes: u64,
}

/// GPUs as NVML sees them, or why there are none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case", deny_unknown_fields)]
pub enum GpuTelemetry {
    /// no NVIDIA driver or library on this host: a normal state, not an error
    NoGpu { reason: String },
    Present { driver_version: Option<String>, devices: Vec<GpuDevice> },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuDevice {
    pub index: u32,
    pub name: String,
    pub utilization_percent: Option<u32>,
    pub memory_total_bytes: Option<u64>,
    pub memory_used_bytes: Option<u64>,
    pub temperature_celsius: Option<u32>,
    pub power_watts: Option<f32>,
    pub processes: Vec<GpuProcess>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuProcess {
    pub pid: u32,
    pub used_memory_bytes: Option<u64>,
}

/// A host's first call: trade a one-time enrolment token for an identity. The host keeps
/// the Ed25519 private key; every later call is signed with it (see [`signing_message`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrolRequest {
    pub version: u32,
    pub token: String,
    /// the host's name in the inventory (unique)
    pub name: String,
    /// the Ed25519 public key, base64 (standard, padded), 32 bytes
    pub public_key: String,
    /// where the appliance reaches this host's RDP and SSH servers
    pub address: String,
    /// NVIDIA GPUs the host offers to labs
    pub gpus: u32,
    /// how many labs the host may run at once
    pub capacity: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrolResponse {
    pub host_id: i64,
    /// send telemetry at least this often; three missed beats mark the host unhealthy
    pub heartbeat_secs: u32,
}

/// A long poll for tasks: the appliance answers as soon as a task is pending, or after
/// `wait_ms` with none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PollRequest {
    pub version: u32,
    pub wait_ms: u64,
    /// tasks the host is running now (checks run side by side): not worth an answer
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub running: Vec<TaskId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PollResponse {
    /// every task of this host still waiting for a report, oldest first (re-delivered
    /// until reported; the host runs each id at most once)
    pub tasks: Vec<HostTask>,
}

/// The header a host signs its calls with:
/// `Authorization: LabrackHost host=ID,ts=UNIX_MS,sig=BASE64`.
pub const HOST_AUTH_SCHEME: &str = "LabrackHost";
/// How far a signed call's timestamp may be from the appliance's clock.
pub const HOST_CLOCK_SKEW_MS: u64 = 120_000;

/// The bytes a host signs: protocol tag, method, path, timestamp and the body's SHA-256,
/// so a signature cannot be moved to another call or another body.
pub fn signing_message(method: &str, path: &str, timestamp_ms: u64, body_sha256_hex: &str) -> Vec<u8> {
    format!("labrack-host-v{PROTOCOL_VERSION}\n{method}\n{path}\n{timestamp_ms}\n{body_sha256_hex}").into_bytes()
}

/// Parses `host=ID,ts=MS,sig=B64` (after the scheme) into its parts.
pub fn parse_host_auth(value: &str) -> Option<(i64, u64, String)> {
    let rest = value.strip_prefix(HOST_AUTH_SCHEME)?.strip_prefix(' ')?;
    let (mut host, mut ts, mut sig) = (None, None, None);
    for part in rest.split(',') {
        match part.trim().split_once('=')? {
            ("host", v) => host = v.parse().ok(),
            ("ts", v) => ts = v.parse().ok(),
            // base64 ends in '=' padding: split_once took the first '=' only
            ("sig", v) => sig = Some(v.to_owned()),
            _ => return None,
        }
    }
    Some((host?, ts?, sig?))
}

/// Why a message from a peer was refused.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// the bytes are not a valid message of this version
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    /// the peer speaks another protocol version
    #[error("protocol version {found} is not supported (this build speaks {PROTOCOL_VERSION})")]
    Version { found: u32 },
}

/// Decodes a host's report, refusing other versions and unknown fields.
pub fn decode_report(bytes: &[u8]) -> Result<TaskReport, DecodeError> {
    let report: TaskReport = serde_json::from_slice(bytes)?;
    if report.version != PROTOCOL_VERSION {
        return Err(DecodeError::Version { found: report.version });
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_round_trip_and_have_a_stable_shape() {
        let task = HostTask {
            version: PROTOCOL_VERSION,
            id: TaskId::new(7, "provision", 1),
            host_id: 3,
            kind: TaskKind::Provision {
                allocation_id: 7,
                template: "gpu-desktop".into(),
                runtime: "local-user".into(),
                skeleton: "/srv/skel".into(),
            },
        };
        let json = serde_json::to_string(&task).expect("encode");
        assert_eq!(
            json,
            r#"{"version":1,"id":"alloc-7-provision-1","host_id":3,"kind":{"type":"provision","allocation_id":7,"template":"gpu-desktop","runtime":"local-user","skeleton":"/srv/skel"}}"#
        );
        assert_eq!(serde_json::from_str::<HostTask>(&json).expect("decode"), task);
    }

    #[test]
    fn reports_are_decoded_strictly() {
        let ok = decode_report(br#"{"version":1,"id":"alloc-1-reset-1","outcome":{"result":"failed","error":"disk full"}}"#).expect("valid");
        assert_eq!(ok.outcome, TaskOutcome::Failed { error: "disk full".into() });
        assert!(matches!(decode_report(br#"{"version":2,"id":"x","outcome":{"result":"succeeded"}}"#), Err(DecodeError::Version { found: 2 })));
        assert!(matches!(decode_report(br#"{"version":1,"id":"x","outcome":{"result":"maybe"}}"#), Err(DecodeError::Malformed(_))));
        assert!(matches!(decode_report(b"\xff\x00"), Err(DecodeError::Malformed(_))));
        let extra = br#"{"version":1,"id":"x","outcome":{"result":"succeeded"},"admin":true}"#;
        assert!(matches!(decode_report(extra), Err(DecodeError::Malformed(_))), "unknown fields refused");
        let with_desktop = decode_report(
            br#"{"version":1,"id":"x","outcome":{"result":"succeeded","desktop":{"username":"lr-a1","password":"pw","rdp_port":3389,"ssh_port":22}}}"#,
        )
        .expect("valid");
        let TaskOutcome::Succeeded { desktop: Some(desktop) } = with_desktop.outcome else { panic!("desktop expected") };
        assert_eq!(desktop.username, "lr-a1");
        assert!(!format!("{desktop:?}").contains("pw"), "the password never reaches logs");
    }

    #[test]
    fn host_auth_headers_parse_and_messages_bind_everything() {
        let parsed = parse_host_auth("LabrackHost host=12,ts=1700000000000,sig=ab+/cd==");
        assert_eq!(parsed, Some((12, 1_700_000_000_000, "ab+/cd==".to_owned())));
        assert_eq!(parse_host_auth("Bearer x"), None);
        assert_eq!(parse_host_auth("LabrackHost host=x,ts=1,sig=a"), None);
        assert_eq!(parse_host_auth("LabrackHost host=1,ts=1"), None);
        assert_eq!(parse_host_auth("LabrackHost host=1,ts=1,sig=a,extra=1"), None);
        let a = signing_message("POST", "/api/v1/host/poll", 1, "00");
        assert_ne!(a, signing_message("POST", "/api/v1/host/report", 1, "00"));
        assert_ne!(a, signing_message("POST", "/api/v1/host/poll", 2, "00"));
        assert_ne!(a, signing_message("POST", "/api/v1/host/poll", 1, "01"));
    }
}
