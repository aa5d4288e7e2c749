//! Desktop runtimes: how a host makes, resets and removes an allocation's lab, and runs its
//! checks.

pub(crate) mod accounts;
pub(crate) mod check;
pub(crate) mod homes;
pub(crate) mod local_user;

use std::path::PathBuf;

use labrack_provisioner::limits::{Enforcement, HostResources};
use labrack_provisioner::protocol::{TaskKind, TaskOutcome};

use crate::isolation::cgroup::Cgroups;
use crate::isolation::gpus::GpuInventory;
use crate::isolation::net::{self, LabNetwork};

/// Settings every runtime needs.
#[derive(Debug, Clone)]
pub(crate) struct RuntimeSettings {
    pub(crate) state_dir: PathBuf,
    /// prefix of the Linux users made for allocations (`{prefix}a{allocation}`)
    pub(crate) user_prefix: String,
    /// skeletons must live below this directory
    pub(crate) skeleton_root: PathBuf,
    /// the host ports labs get: two per lab (RDP, SSH), from the first
    pub(crate) first_port: u16,
    pub(crate) last_port: u16,
    /// where labs' links to the host are carved from
    pub(crate) lab_network: LabNetwork,
    /// the SSH host key every lab's sshd presents (public line), reported for pinning
    pub(crate) ssh_host_key: Option<String>,
    /// SHA-256 (hex) of the certificate every lab's xrdp presents, reported for pinning
    pub(crate) rdp_cert_sha256: Option<String>,
    pub(crate) cgroups: Cgroups,
    /// the GPUs labs may be given (whole, or MIG slices)
    pub(crate) gpus: GpuInventory,
}

impl RuntimeSettings {
    /// How many labs the port range and the lab network leave room for.
    pub(crate) fn slots(&self) -> u32 {
        // Two ports a lab: (last - first + 1) / 2 pairs.
        let ports = u32::from(self.last_port)
            .saturating_sub(u32::from(self.first_port))
            .div_ceil(2);
        ports.min(self.lab_network.slots())
    }

    /// The RDP and SSH ports of slot `slot`.
    pub(crate) fn ports(&self, slot: u32) -> Option<(u16, u16)> {
        let rdp = u32::from(self.first_port) + slot * 2;
        let ssh = rdp + 1;
        (ssh <= u32::from(self.last_port))
            .then(|| (u16::try_from(rdp).ok(), u16::try_from(ssh).ok()))
            .and_then(|(a, b)| Some((a?, b?)))
    }

    /// What this host has and can enforce, as it tells the appliance.
    pub(crate) fn resources(&self) -> HostResources {
        host_resources(&self.cgroups, &self.gpus)
    }
}

/// What a host has and can enforce with `cgroups` and `gpus`.
pub(crate) fn host_resources(cgroups: &Cgroups, gpus: &GpuInventory) -> HostResources {
    {
        let mut system = sysinfo::System::new();
        system.refresh_memory();
        let cpus =
            u32::try_from(std::thread::available_parallelism().map_or(1, std::num::NonZero::get))
                .unwrap_or(1);
        let pids_max = std::fs::read_to_string("/proc/sys/kernel/pid_max")
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(32_768);
        let mut enforces = cgroups.enforces();
        if net::available() {
            enforces.push(Enforcement::Network);
        }
        if homes::DiskImage::available() {
            enforces.push(Enforcement::Disk);
        }
        enforces.sort();
        HostResources {
            cpus,
            memory_mib: system.total_memory() / (1024 * 1024),
            pids_max,
            gpus: gpus.count(),
            gpu_units: gpus.units(),
            isolation: cgroups.name().to_owned(),
            enforces,
        }
    }
}

/// Runs one task and says how it ended; never panics on bad input.
pub(crate) fn run_task(settings: &RuntimeSettings, kind: &TaskKind) -> TaskOutcome {
    let desktop = match kind {
        TaskKind::Provision {
            allocation_id,
            runtime,
            skeleton,
            password,
            limits,
            gpus,
            ..
        } => match runtime.as_str() {
            "local-user" => local_user::provision(
                settings,
                *allocation_id,
                skeleton,
                &password.0,
                limits,
                gpus,
            )
            .map(Some),
            other => Err(anyhow::anyhow!(
                "this host does not know the desktop runtime {other:?}"
            )),
        },
        TaskKind::Reset {
            allocation_id,
            skeleton,
            password,
            limits,
            gpus,
        } => local_user::reset(
            settings,
            *allocation_id,
            skeleton,
            &password.0,
            limits,
            gpus,
        )
        .map(Some),
        TaskKind::Release { allocation_id } => {
            local_user::release(settings, *allocation_id).map(|()| None)
        }
        TaskKind::RunCheck {
            allocation_id,
            check_run_id,
            name,
            script,
            timeout_secs,
            memory_mib,
            network,
        } => {
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
                Err(error) => TaskOutcome::Failed {
                    error: format!("{error:#}"),
                },
            };
        }
    };
    match desktop {
        Ok(desktop) => TaskOutcome::Succeeded { desktop },
        Err(error) => TaskOutcome::Failed {
            error: format!("{error:#}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_bounded_by_ports_and_the_lab_network() {
        let settings = RuntimeSettings {
            state_dir: "/var/lib/labrack-host".into(),
            user_prefix: "lr-".into(),
            skeleton_root: homes::DEFAULT_SKELETON_ROOT.into(),
            first_port: 42_000,
            last_port: 42_009,
            lab_network: "100.64.0.0/16".parse().expect("network"),
            ssh_host_key: None,
            rdp_cert_sha256: None,
            cgroups: Cgroups::V2Systemd,
            gpus: GpuInventory::default(),
        };
        assert_eq!(settings.slots(), 5);
        assert_eq!(settings.ports(0), Some((42_000, 42_001)));
        assert_eq!(settings.ports(4), Some((42_008, 42_009)));
        assert_eq!(settings.ports(5), None);
        let small = RuntimeSettings {
            lab_network: "100.64.0.0/30".parse().expect("network"),
            ..settings
        };
        assert_eq!(small.slots(), 2);
    }
}
