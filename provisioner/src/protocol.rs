//! Versioned wire types of the appliance↔host task protocol. Hosts pull tasks; each task
//! has an id that is stable across re-deliveries, so a host runs it at most once.

use serde::{Deserialize, Serialize};

use crate::limits::{HostResources, LabLimits};

/// The protocol version this build speaks; a peer with another major version is refused.
pub const PROTOCOL_VERSION: u32 = 2;

/// A lab desktop's password, chosen by the appliance and sent with the task that sets it.
/// It never appears in logs (`Debug` hides it) and the host never writes it down.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Password(pub String);

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() {
            "<unset>"
        } else {
            "<redacted>"
        })
    }
}

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
    /// create the allocation's lab from a template: its box with these limits and GPUs, its
    /// home from the skeleton, its desktop password
    Provision {
        allocation_id: i64,
        template: String,
        runtime: String,
        skeleton: String,
        password: Password,
        limits: LabLimits,
        /// the GPU indices the lab holds on this host
        gpus: Vec<u32>,
    },
    /// end everything of the lab, restore its home from the skeleton, set the new password
    Reset {
        allocation_id: i64,
        skeleton: String,
        password: Password,
        limits: LabLimits,
        gpus: Vec<u32>,
    },
    /// remove the desktop and everything it owned
    Release { allocation_id: i64 },
    /// run one of the template's checks against the allocation's lab, sandboxed: as the
    /// lab's checker, within `timeout_secs` and `memory_mib`, in the lab's network
    /// namespace when `network` (else in none)
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

    /// The password slot of a task that sets one (the appliance fills it in).
    pub fn password_mut(&mut self) -> Option<&mut Password> {
        match self {
            Self::Provision { password, .. } | Self::Reset { password, .. } => Some(password),
            Self::Release { .. } | Self::RunCheck { .. } => None,
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
    Failed {
        error: String,
    },
    /// a check ran (whether it passed is in the result); `Failed` means it could not run
    Checked {
        check: crate::check::CheckResult,
    },
}

impl TaskOutcome {
    /// Success without desktop details (release).
    pub fn done() -> Self {
        Self::Succeeded { desktop: None }
    }
}

/// How the appliance reaches an allocation's desktop and shell, sent by the host after a
/// provision or reset. The password is not in it: the appliance chose it and sent it with
/// the task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesktopAccess {
    pub username: String,
    /// the lab's RDP port on the host (forwarded to the lab's own xrdp)
    pub rdp_port: u16,
    /// the lab's SSH port on the host (forwarded to the lab's own sshd)
    pub ssh_port: u16,
    /// the SSH server's public host key (OpenSSH line), so the appliance can verify it
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_host_key: Option<String>,
    /// SHA-256 (hex) of the RDP server's TLS certificate, so the appliance can pin it
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdp_cert_sha256: Option<String>,
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
    /// what the host has and can enforce (it may change: a kernel, a driver)
    pub resources: HostResources,
    /// each lab's use of what it was given
    #[serde(default)]
    pub labs: Vec<LabUsage>,
}

/// One lab's use of its host, attributed by its cgroup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabUsage {
    pub allocation_id: i64,
    /// the GPU indices it holds
    pub gpus: Vec<u32>,
    /// GPU memory its processes use (NVML), summed over its GPUs
    pub gpu_memory_bytes: u64,
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
    Present {
        driver_version: Option<String>,
        devices: Vec<GpuDevice>,
    },
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
    /// where the appliance reaches this host's labs' RDP and SSH ports
    pub address: String,
    /// how many labs the host may run at once
    pub capacity: u32,
    /// its size (CPUs, memory, GPUs) and the limits it can enforce
    pub resources: HostResources,
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
/// `Authorization: LabrackHost host=ID,ts=UNIX_MS,i=INSTANCE,n=COUNTER,sig=BASE64`.
///
/// `INSTANCE` is random per agent process (16 hex digits) and `COUNTER` counts its calls
/// from 1: together they make every signed call unique, so the appliance refuses a replay,
/// and an identity used by two machines at once shows as two instances taking turns.
pub const HOST_AUTH_SCHEME: &str = "LabrackHost";
/// How far a signed call's timestamp may be from the appliance's clock.
pub const HOST_CLOCK_SKEW_MS: u64 = 120_000;

/// A parsed host `Authorization` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostAuth {
    pub host_id: i64,
    pub timestamp_ms: u64,
    /// the agent process's random instance id
    pub instance: String,
    /// the call's number within the instance (from 1)
    pub counter: u64,
    pub signature: String,
}

/// The bytes a host signs: protocol tag, method, path, timestamp, instance, counter and the
/// body's SHA-256, so a signature cannot be moved to another call or another body, nor
/// replayed.
pub fn signing_message(
    method: &str,
    path: &str,
    timestamp_ms: u64,
    instance: &str,
    counter: u64,
    body_sha256_hex: &str,
) -> Vec<u8> {
    format!("labrack-host-v{PROTOCOL_VERSION}\n{method}\n{path}\n{timestamp_ms}\n{instance}\n{counter}\n{body_sha256_hex}").into_bytes()
}

/// A valid instance id: 16 lowercase hex digits.
pub fn valid_instance(instance: &str) -> bool {
    instance.len() == 16
        && instance
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Parses `host=ID,ts=MS,i=INSTANCE,n=COUNTER,sig=B64` (after the scheme).
pub fn parse_host_auth(value: &str) -> Option<HostAuth> {
    let rest = value.strip_prefix(HOST_AUTH_SCHEME)?.strip_prefix(' ')?;
    let (mut host, mut ts, mut instance, mut counter, mut sig) = (None, None, None, None, None);
    for part in rest.split(',') {
        match part.trim().split_once('=')? {
            ("host", v) => host = v.parse().ok(),
            ("ts", v) => ts = v.parse().ok(),
            ("i", v) if valid_instance(v) => instance = Some(v.to_owned()),
            ("n", v) => counter = v.parse().ok().filter(|n| *n > 0),
            // base64 ends in '=' padding: split_once took the first '=' only
            ("sig", v) => sig = Some(v.to_owned()),
            _ => return None,
        }
    }
    Some(HostAuth {
        host_id: host?,
        timestamp_ms: ts?,
        instance: instance?,
        counter: counter?,
        signature: sig?,
    })
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
        return Err(DecodeError::Version {
            found: report.version,
        });
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
                password: Password("abcdefghijkmnpqrstuvw".into()),
                limits: LabLimits::default(),
                gpus: vec![1],
            },
        };
        let json = serde_json::to_string(&task).expect("encode");
        assert_eq!(
            json,
            r#"{"version":2,"id":"alloc-7-provision-1","host_id":3,"kind":{"type":"provision","allocation_id":7,"template":"gpu-desktop","runtime":"local-user","skeleton":"/srv/skel","password":"abcdefghijkmnpqrstuvw","limits":{"cpu_millicores":2000,"cpu_weight":100,"memory_mib":4096,"pids":1024,"network":"none"},"gpus":[1]}}"#
        );
        assert_eq!(
            serde_json::from_str::<HostTask>(&json).expect("decode"),
            task
        );
        assert!(
            !format!("{task:?}").contains("abcdefghijk"),
            "the password never reaches logs"
        );
    }

    #[test]
    fn reports_are_decoded_strictly() {
        let ok = decode_report(br#"{"version":2,"id":"alloc-1-reset-1","outcome":{"result":"failed","error":"disk full"}}"#).expect("valid");
        assert_eq!(
            ok.outcome,
            TaskOutcome::Failed {
                error: "disk full".into()
            }
        );
        assert!(matches!(
            decode_report(br#"{"version":1,"id":"x","outcome":{"result":"succeeded"}}"#),
            Err(DecodeError::Version { found: 1 })
        ));
        assert!(matches!(
            decode_report(br#"{"version":2,"id":"x","outcome":{"result":"maybe"}}"#),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode_report(b"\xff\x00"),
            Err(DecodeError::Malformed(_))
        ));
        let extra = br#"{"version":2,"id":"x","outcome":{"result":"succeeded"},"admin":true}"#;
        assert!(
            matches!(decode_report(extra), Err(DecodeError::Malformed(_))),
            "unknown fields refused"
        );
        let with_desktop =
            decode_report(br#"{"version":2,"id":"x","outcome":{"result":"succeeded","desktop":{"username":"lr-a1","rdp_port":42000,"ssh_port":42001}}}"#)
                .expect("valid");
        let TaskOutcome::Succeeded {
            desktop: Some(desktop),
        } = with_desktop.outcome
        else {
            panic!("desktop expected")
        };
        assert_eq!(
            (desktop.username.as_str(), desktop.rdp_port),
            ("lr-a1", 42000)
        );
        let with_password = br#"{"version":2,"id":"x","outcome":{"result":"succeeded","desktop":{"username":"lr-a1","password":"pw","rdp_port":1,"ssh_port":2}}}"#;
        assert!(
            matches!(decode_report(with_password), Err(DecodeError::Malformed(_))),
            "hosts no longer send passwords"
        );
    }

    #[test]
    fn host_auth_headers_parse_and_messages_bind_everything() {
        let parsed = parse_host_auth(
            "LabrackHost host=12,ts=1700000000000,i=0123456789abcdef,n=7,sig=ab+/cd==",
        );
        assert_eq!(
            parsed,
            Some(HostAuth {
                host_id: 12,
                timestamp_ms: 1_700_000_000_000,
                instance: "0123456789abcdef".into(),
                counter: 7,
                signature: "ab+/cd==".into()
            })
        );
        assert_eq!(parse_host_auth("Bearer x"), None);
        assert_eq!(
            parse_host_auth("LabrackHost host=x,ts=1,i=0123456789abcdef,n=1,sig=a"),
            None
        );
        assert_eq!(
            parse_host_auth("LabrackHost host=1,ts=1,sig=a"),
            None,
            "instance and counter are required"
        );
        assert_eq!(
            parse_host_auth("LabrackHost host=1,ts=1,i=XYZ,n=1,sig=a"),
            None
        );
        assert_eq!(
            parse_host_auth("LabrackHost host=1,ts=1,i=0123456789abcdef,n=0,sig=a"),
            None,
            "counters start at 1"
        );
        assert_eq!(
            parse_host_auth("LabrackHost host=1,ts=1,i=0123456789abcdef,n=1,sig=a,extra=1"),
            None
        );
        let a = signing_message("POST", "/api/v1/host/poll", 1, "0123456789abcdef", 1, "00");
        assert_ne!(
            a,
            signing_message(
                "POST",
                "/api/v1/host/report",
                1,
                "0123456789abcdef",
                1,
                "00"
            )
        );
        assert_ne!(
            a,
            signing_message("POST", "/api/v1/host/poll", 2, "0123456789abcdef", 1, "00")
        );
        assert_ne!(
            a,
            signing_message("POST", "/api/v1/host/poll", 1, "0123456789abcdef", 2, "00")
        );
        assert_ne!(
            a,
            signing_message("POST", "/api/v1/host/poll", 1, "fedcba9876543210", 1, "00")
        );
        assert_ne!(
            a,
            signing_message("POST", "/api/v1/host/poll", 1, "0123456789abcdef", 1, "01")
        );
    }
}
