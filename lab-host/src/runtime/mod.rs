//! Desktop runtimes: how a host makes, resets and removes an allocation's desktop.

pub(crate) mod check;
pub(crate) mod local_user;

use labrack_provisioner::protocol::{DesktopAccess, TaskKind, TaskOutcome};

/// Settings every runtime needs.
#[derive(Debug, Clone)]
pub(crate) struct RuntimeSettings {
    /// prefix of the Linux users made for allocations (`{prefix}a{allocation}`)
    pub(crate) user_prefix: String,
    /// the port of the host's RDP server (xrdp)
    pub(crate) rdp_port: u16,
    /// the port of the host's SSH server
    pub(crate) ssh_port: u16,
    /// the SSH server's public host key, reported so the appliance can verify it
    pub(crate) ssh_host_key: Option<String>,
    /// SHA-256 (hex) of the RDP server's certificate, reported so the appliance can pin it
    pub(crate) rdp_cert_sha256: Option<String>,
}

/// Runs one task and says how it ended; never panics on bad input.
pub(crate) fn run_task(settings: &RuntimeSettings, kind: &TaskKind) -> TaskOutcome {
    let desktop = match kind {
        TaskKind::Provision { allocation_id, runtime, skeleton, .. } => match runtime.as_str() {
            "local-user" => local_user::provision(settings, *allocation_id, skeleton).map(Some),
            other => Err(anyhow::anyhow!("this host does not know the desktop runtime {other:?}")),
        },
        TaskKind::Reset { allocation_id, skeleton } => local_user::reset(settings, *allocation_id, skeleton).map(Some),
        TaskKind::Release { allocation_id } => local_user::release(settings, *allocation_id).map(|()| None),
        TaskKind::RunCheck { allocation_id, check_run_id, name, script, timeout_secs, memory_mib, network } => {
            let spec = check::CheckSpec {
                allocation_id: *allocation_id,
                check_run_id: *check_run_id,
                name,
                script,
                timeout_secs: *timeout_secs,
                memory_mib: *memory_mib,
                network: *network,
            };
            return match check::run(settings, &spec) {
                Ok(check) => TaskOutcome::Checked { check },
                Err(error) => TaskOutcome::Failed { error: format!("{error:#}") },
            };
        }
    };
    match desktop {
        Ok(desktop) => TaskOutcome::Succeeded { desktop: desktop.map(|d: DesktopAccess| d) },
        Err(error) => TaskOutcome::Failed { error: format!("{error:#}") },
    }
}
