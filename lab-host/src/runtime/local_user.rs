//! The `local-user` desktop runtime: one dedicated Linux user per allocation, whose desktop
//! and shell run inside the lab's box (its own xrdp and sshd: see `isolation`), and one
//! checker user its checks run as.
//!
//! - provision: create both users, build the home from the template's skeleton, set the
//!   password the appliance chose, start the box;
//! - reset: stop the box and end every process of the user anywhere, remove its crontab,
//!   `at` jobs and lingering units, build a fresh home, set the new password, start the box;
//! - release: all of that gone for good, the users too.
//!
//! Every step is idempotent, so a retried task converges. The password is never written to
//! disk by this host: the appliance sends it with the task and keeps the only copy.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use labrack_provisioner::limits::{Enforcement, LabLimits};
use labrack_provisioner::protocol::DesktopAccess;

use super::RuntimeSettings;
use super::accounts::{self, Account};
use super::homes::{self, DiskImage};
use crate::isolation::cgroup::Cgroups;
use crate::isolation::gpus::GpuGrant;
use crate::isolation::{self, LabRecord};

/// One lab task (provision, reset, release) at a time, and never while the agent brings
/// boxes back up (a box must not be started in the middle of a reset).
pub(crate) static LAB_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub(crate) fn username(settings: &RuntimeSettings, allocation_id: i64) -> String {
    accounts::lab_user(&settings.user_prefix, allocation_id)
}

fn disk_image(state_dir: &Path, user: &str, limits: &LabLimits) -> Option<DiskImage> {
    limits.disk_mib.map(|mib| DiskImage {
        file: state_dir.join("disks").join(format!("{user}.img")),
        mib,
    })
}

/// Refuses limits this host cannot enforce, naming the template field; gives what the
/// assigned GPU indices are here.
pub(crate) fn check_enforceable(
    settings: &RuntimeSettings,
    limits: &LabLimits,
    gpus: &[u32],
) -> anyhow::Result<Vec<GpuGrant>> {
    let resources = settings.resources();
    let enforces = &resources.enforces;
    for need in limits.needs() {
        if !enforces.contains(&need) {
            let why = match need {
                Enforcement::Disk => {
                    "no loop devices or mkfs.ext4 for a disk image per lab".to_owned()
                }
                Enforcement::Network => {
                    "no nftables or iproute2 for a network namespace per lab".to_owned()
                }
                Enforcement::IoWeight => format!(
                    "{} offers no IO weight here (no BFQ scheduler)",
                    resources.isolation
                ),
                other => format!("{} cannot limit {}", resources.isolation, other.field()),
            };
            bail!("this host cannot enforce {}: {why}", need.field());
        }
    }
    if !gpus.is_empty() && !enforces.contains(&Enforcement::Devices) {
        bail!(
            "this host cannot enforce gpus: {} has no device rules, so a lab could open every GPU",
            resources.isolation
        );
    }
    let grants = settings.gpus.grants(gpus).map_err(|gpu| {
        anyhow::anyhow!(
            "gpus: GPU {gpu} does not exist on this host (it has {})",
            resources.gpus
        )
    })?;
    limits
        .fit(
            u32::try_from(gpus.len()).unwrap_or(u32::MAX),
            None,
            &resources,
        )
        .map_err(|unfit| anyhow::anyhow!("this host cannot run the lab: {unfit}"))?;
    Ok(grants)
}

/// The lowest slot no lab of this host holds, within the port range and the lab network.
fn free_slot(settings: &RuntimeSettings) -> anyhow::Result<u32> {
    let taken: Vec<u32> = isolation::records(&settings.state_dir)?
        .iter()
        .map(|r| r.slot)
        .collect();
    let slots = settings.slots();
    (0..slots)
        .find(|slot| !taken.contains(slot))
        .with_context(|| {
            format!("all {slots} lab slots of this host are in use (--lab-ports, --lab-network)")
        })
}

fn access(settings: &RuntimeSettings, record: &LabRecord) -> DesktopAccess {
    DesktopAccess {
        username: record.user.clone(),
        rdp_port: record.rdp_port,
        ssh_port: record.ssh_port,
        ssh_host_key: settings.ssh_host_key.clone(),
        rdp_cert_sha256: settings.rdp_cert_sha256.clone(),
    }
}

/// What a provision or reset is handed, checked before anything is touched: the password,
/// the skeleton (its canonical path under the skeleton root), the limits and the GPUs.
fn admit(
    settings: &RuntimeSettings,
    skeleton: &str,
    password: &str,
    limits: &LabLimits,
    gpus: &[u32],
) -> anyhow::Result<(PathBuf, Vec<GpuGrant>)> {
    accounts::check_password(password)?;
    let skeleton = homes::check_skeleton(&settings.skeleton_root, skeleton)?;
    let grants = check_enforceable(settings, limits, gpus)?;
    Ok((skeleton, grants))
}

fn lab_lock() -> anyhow::Result<std::sync::MutexGuard<'static, ()>> {
    LAB_LOCK
        .lock()
        .map_err(|_| anyhow::anyhow!("the lab lock is poisoned"))
}

pub(crate) fn provision(
    settings: &RuntimeSettings,
    allocation_id: i64,
    skeleton: &str,
    password: &str,
    limits: &LabLimits,
    gpus: &[u32],
) -> anyhow::Result<DesktopAccess> {
    let _lock = lab_lock()?;
    let (skeleton, gpu_grants) = admit(settings, skeleton, password, limits, gpus)?;
    let user = username(settings, allocation_id);
    // Left over from an interrupted attempt: start clean.
    remove_lab(&settings.state_dir, &settings.cgroups, &user)?;
    let slot = free_slot(settings)?;
    let (rdp_port, ssh_port) = settings
        .ports(slot)
        .context("no ports left in --lab-ports")?;
    let account = accounts::create_lab_user(&user, allocation_id)?;
    let checker =
        accounts::create_checker(&accounts::checker_of(&user), account.gid, allocation_id)?;
    homes::rebuild(
        &account.home,
        &skeleton,
        account.uid,
        account.gid,
        disk_image(&settings.state_dir, &user, limits).as_ref(),
    )?;
    accounts::set_password(&user, password)?;
    let record = LabRecord {
        allocation_id,
        user: user.clone(),
        checker: checker.name,
        slot,
        rdp_port,
        ssh_port,
        limits: limits.clone(),
        gpus: gpus.to_vec(),
        gpu_grants,
    };
    isolation::save_record(&settings.state_dir, &record)?;
    isolation::start(&settings.state_dir, &user)?;
    Ok(access(settings, &record))
}

pub(crate) fn reset(
    settings: &RuntimeSettings,
    allocation_id: i64,
    skeleton: &str,
    password: &str,
    limits: &LabLimits,
    gpus: &[u32],
) -> anyhow::Result<DesktopAccess> {
    let _lock = lab_lock()?;
    let (skeleton, gpu_grants) = admit(settings, skeleton, password, limits, gpus)?;
    let user = username(settings, allocation_id);
    let account = accounts::lookup(&user)?
        .with_context(|| format!("the lab user {user} does not exist on this host"))?;
    let mut record = isolation::load_record(&settings.state_dir, &user)?
        .with_context(|| format!("this host has no record of lab {user}"))?;
    // Before touching the home: nothing of the team may run, anywhere.
    isolation::stop(&settings.state_dir, &settings.cgroups, &user)?;
    accounts::end_processes(account.uid)?;
    if let Some(checker) = accounts::lookup(&record.checker)? {
        accounts::end_processes(checker.uid)?;
    }
    accounts::remove_leftovers(&account)?;
    homes::rebuild(
        &account.home,
        &skeleton,
        account.uid,
        account.gid,
        disk_image(&settings.state_dir, &user, limits).as_ref(),
    )?;
    accounts::set_password(&user, password)?;
    record.limits = limits.clone();
    record.gpus = gpus.to_vec();
    record.gpu_grants = gpu_grants;
    isolation::save_record(&settings.state_dir, &record)?;
    isolation::start(&settings.state_dir, &user)?;
    Ok(access(settings, &record))
}

pub(crate) fn release(settings: &RuntimeSettings, allocation_id: i64) -> anyhow::Result<()> {
    let _lock = lab_lock()?;
    remove_lab(
        &settings.state_dir,
        &settings.cgroups,
        &username(settings, allocation_id),
    )
}

/// Removes everything of a lab, whatever state it is in.
pub(crate) fn remove_lab(state_dir: &Path, cgroups: &Cgroups, user: &str) -> anyhow::Result<()> {
    let record = isolation::load_record(state_dir, user)?;
    isolation::remove(state_dir, cgroups, user)?;
    let account: Option<Account> = accounts::lookup(user)?;
    // The checker first: its group is the lab user's, which userdel removes with the user.
    accounts::remove_user(&accounts::checker_of(user))?;
    if account.is_some() {
        accounts::remove_user(user)?;
    }
    let home = account.map_or_else(|| PathBuf::from(format!("/home/{user}")), |a| a.home);
    let limits = record.map(|r| r.limits).unwrap_or_default();
    let disk = disk_image(state_dir, user, &limits).unwrap_or(DiskImage {
        file: state_dir.join("disks").join(format!("{user}.img")),
        mib: 0,
    });
    disk.remove(&home)?;
    if home.starts_with("/home") && home != Path::new("/home") {
        homes::remove_tree(&home)?;
    }
    let _ = std::fs::remove_file(format!("/var/mail/{user}"));
    isolation::remove_record(state_dir, user);
    Ok(())
}

/// Brings every lab's box back up (after an agent restart, a host reboot, or a box that
/// died), its home mounted first where it has a disk image.
pub(crate) fn ensure_boxes(settings: &RuntimeSettings) {
    let Ok(_lock) = LAB_LOCK.try_lock() else {
        return;
    };
    let records = match isolation::records(&settings.state_dir) {
        Ok(records) => records,
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "cannot read the labs' records");
            return;
        }
    };
    for record in records {
        if isolation::supervisor_pid(&settings.state_dir, &record.user).is_some() {
            continue;
        }
        if let Some(disk) = disk_image(&settings.state_dir, &record.user, &record.limits)
            && let Err(error) = disk.ensure_mounted(Path::new(&format!("/home/{}", record.user)))
        {
            tracing::error!(lab = %record.user, error = %format!("{error:#}"), "cannot mount the lab's home");
            continue;
        }
        tracing::warn!(lab = %record.user, "the lab's box is not running; starting it");
        if let Err(error) = isolation::start(&settings.state_dir, &record.user) {
            tracing::error!(lab = %record.user, error = %format!("{error:#}"), "cannot start the lab's box");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(cgroups: Cgroups, gpus: u32) -> RuntimeSettings {
        RuntimeSettings {
            state_dir: "/var/lib/labrack-host".into(),
            user_prefix: "lr-".into(),
            skeleton_root: super::super::homes::DEFAULT_SKELETON_ROOT.into(),
            first_port: 42_000,
            last_port: 42_099,
            lab_network: "100.64.0.0/16".parse().expect("network"),
            ssh_host_key: None,
            rdp_cert_sha256: None,
            cgroups,
            gpus: crate::isolation::gpus::GpuInventory::counted(gpus),
        }
    }

    #[test]
    fn a_host_refuses_limits_it_cannot_enforce_naming_them() {
        let v1 = || Cgroups::V1 {
            root: "/sys/fs/cgroup".into(),
            controllers: vec![],
            io_weight_file: None,
        };
        let io = LabLimits {
            io_weight: Some(200),
            ..LabLimits::default()
        };
        let refused =
            check_enforceable(&settings(v1(), 0), &io, &[]).expect_err("no IO weight without BFQ");
        assert!(
            refused.to_string().contains("cannot enforce io_weight"),
            "{refused}"
        );
        let refused = check_enforceable(&settings(v1(), 1), &LabLimits::default(), &[3])
            .expect_err("no GPU 3 here");
        assert!(
            refused.to_string().contains("GPU 3 does not exist"),
            "{refused}"
        );
        let no_devices = Cgroups::V2 {
            base: "/sys/fs/cgroup/labrack".into(),
        };
        let refused = check_enforceable(&settings(no_devices, 2), &LabLimits::default(), &[0])
            .expect_err("no device rules on plain cgroup v2");
        assert!(refused.to_string().contains("gpus"), "{refused}");
        let huge = LabLimits {
            memory_mib: 1 << 30,
            ..LabLimits::default()
        };
        let refused = check_enforceable(&settings(v1(), 0), &huge, &[])
            .expect_err("more memory than the host has");
        assert!(refused.to_string().contains("memory_mib"), "{refused}");
    }
}
