//! Versioned wire types of the appliance↔host task protocol. Hosts pull tasks; each task
//! has an id that is stable across re-deliveries, so a host runs it at most once.

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks; a peer with another major version is refused.
pub const PROTOCOL_VERSION: u32 = 1;

/// Identifies one task: `alloc-{allocation}-{kind}-{attempt}`. Re-delivering the same task
/// reuses the id; a retry after a failure gets a new attempt number and so a new id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskId(pub String);

impl TaskId {
    pub fn new(allocation_id: i64, kind: &str, attempt: u32) -> Self {
        Self(format!("alloc-{allocation_id}-{kind}-{attempt}"))
    }
}

/// What a host is asked to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum TaskKind {
    /// create the allocation's desktop from a template
    Provision { allocation_id: i64, template: String },
    /// end the session and restore the desktop from the template's skeleton
    Reset { allocation_id: i64 },
    /// remove the desktop and everything it owned
    Release { allocation_id: i64 },
}

impl TaskKind {
    /// Short name used in task ids and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Provision { .. } => "provision",
            Self::Reset { .. } => "reset",
            Self::Release { .. } => "release",
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
    Succeeded,
    Failed { error: String },
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
            kind: TaskKind::Provision { allocation_id: 7, template: "gpu-desktop".into() },
        };
        let json = serde_json::to_string(&task).expect("encode");
        assert_eq!(
            json,
            r#"{"version":1,"id":"alloc-7-provision-1","host_id":3,"kind":{"type":"provision","allocation_id":7,"template":"gpu-desktop"}}"#
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
    }
}
