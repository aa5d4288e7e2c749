//! Host telemetry: CPU, memory and disks via sysinfo; GPUs via NVML (nvml-wrapper), which
//! is loaded at run time. Without an NVIDIA driver NVML fails to load: that is reported as
//! `NoGpu` with the reason, once, not as an error.

use std::time::Duration;

use labrack_provisioner::limits::HostResources;
use labrack_provisioner::protocol::{
    DiskUsage, GpuDevice, GpuProcess, GpuTelemetry, LabUsage, PROTOCOL_VERSION, Telemetry,
};

use crate::isolation::LabRecord;
use crate::isolation::gpus::{MigSlice, PhysicalGpu};
use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::enums::device::UsedGpuMemory;

/// Samples the host once; CPU use is measured over `interval`. Each lab's GPU memory is
/// summed from NVML's processes, attributed to a lab by `lab_of` (its cgroup).
pub(crate) fn sample(
    interval: Duration,
    resources: HostResources,
    labs: &[LabRecord],
    lab_of: impl Fn(u32) -> Option<String>,
) -> Telemetry {
    let mut system = sysinfo::System::new();
    system.refresh_cpu_usage();
    std::thread::sleep(interval.max(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL));
    system.refresh_cpu_usage();
    system.refresh_memory();
    let disks = sysinfo::Disks::new_with_refreshed_list()
        .list()
        .iter()
        .map(|d| DiskUsage {
            mount_point: d.mount_point().display().to_string(),
            total_bytes: d.total_space(),
            available_bytes: d.available_space(),
        })
        .collect();
    let gpus = gpus();
    Telemetry {
        version: PROTOCOL_VERSION,
        cpu_percent: system.global_cpu_usage(),
        cpu_count: u32::try_from(system.cpus().len()).unwrap_or(u32::MAX),
        memory_total_bytes: system.total_memory(),
        memory_used_bytes: system.used_memory(),
        labs: lab_usage(&gpus, labs, lab_of),
        disks,
        gpus,
        resources,
    }
}

/// GPU memory per lab: every NVML process whose cgroup is a lab's counts for that lab.
pub(crate) fn lab_usage(
    gpus: &GpuTelemetry,
    labs: &[LabRecord],
    lab_of: impl Fn(u32) -> Option<String>,
) -> Vec<LabUsage> {
    let GpuTelemetry::Present { devices, .. } = gpus else {
        return labs
            .iter()
            .map(|lab| LabUsage {
                allocation_id: lab.allocation_id,
                gpus: lab.gpus.clone(),
                gpu_memory_bytes: 0,
            })
            .collect();
    };
    labs.iter()
        .map(|lab| {
            let used = devices
                .iter()
                .flat_map(|d| d.processes.iter())
                .filter(|p| lab_of(p.pid).as_deref() == Some(lab.user.as_str()))
                .map(|p| p.used_memory_bytes.unwrap_or(0))
                .sum();
            LabUsage {
                allocation_id: lab.allocation_id,
                gpus: lab.gpus.clone(),
                gpu_memory_bytes: used,
            }
        })
        .collect()
}

/// The physical GPUs and, for those in MIG mode, their MIG devices (none without a
/// driver). A GPU NVML cannot describe is left out, as it could not be granted safely.
pub(crate) fn physical_gpus() -> Vec<PhysicalGpu> {
    let Ok(nvml) = Nvml::init() else {
        return Vec::new();
    };
    let count = nvml.device_count().unwrap_or(0);
    (0..count)
        .filter_map(|index| {
            let device = nvml.device_by_index(index).ok()?;
            let minor = device.minor_number().ok()?;
            let mig = match device.mig_mode() {
                Ok(mode) if mode.current == 1 => Some(mig_slices(&device)),
                _ => None,
            };
            Some(PhysicalGpu {
                minor,
                uuid: device.uuid().ok(),
                memory_mib: device.memory_info().map(|m| m.total >> 20).unwrap_or(0),
                mig,
            })
        })
        .collect()
}

/// The MIG devices of `device`: NVML numbers the possible ones, and an empty slot is
/// an error, skipped.
fn mig_slices(device: &nvml_wrapper::Device<'_>) -> Vec<MigSlice> {
    (0..device.mig_device_count().unwrap_or(0))
        .filter_map(|i| {
            let mig = device.mig_device_by_index(i).ok()?;
            let (gpu_instance, compute_instance) = crate::nvml_ids::instance_ids(&mig)?;
            Some(MigSlice {
                uuid: mig.uuid().ok()?,
                memory_mib: mig.memory_info().ok()?.total >> 20,
                gpu_instance,
                compute_instance,
            })
        })
        .collect()
}

/// The processes on a GPU, and on its MIG devices (which NVML lists only there).
fn compute_processes(device: &nvml_wrapper::Device<'_>) -> Vec<GpuProcess> {
    let mut all = device.running_compute_processes().unwrap_or_default();
    if matches!(device.mig_mode(), Ok(mode) if mode.current == 1) {
        for i in 0..device.mig_device_count().unwrap_or(0) {
            if let Ok(mig) = device.mig_device_by_index(i) {
                all.extend(mig.running_compute_processes().unwrap_or_default());
            }
        }
    }
    all.into_iter()
        .map(|p| GpuProcess {
            pid: p.pid,
            used_memory_bytes: match p.used_gpu_memory {
                UsedGpuMemory::Used(bytes) => Some(bytes),
                UsedGpuMemory::Unavailable => None,
            },
        })
        .collect()
}

/// GPU telemetry; each NVML query that a device does not support is left `None`.
pub(crate) fn gpus() -> GpuTelemetry {
    let nvml = match Nvml::init() {
        Ok(nvml) => nvml,
        Err(error) => {
            return GpuTelemetry::NoGpu {
                reason: format!("NVML unavailable: {error}"),
            };
        }
    };
    let count = match nvml.device_count() {
        Ok(count) => count,
        Err(error) => {
            return GpuTelemetry::NoGpu {
                reason: format!("NVML device count failed: {error}"),
            };
        }
    };
    let devices = (0..count)
        .filter_map(|index| {
            let device = nvml.device_by_index(index).ok()?;
            let memory = device.memory_info().ok();
            Some(GpuDevice {
                index,
                name: device
                    .name()
                    .unwrap_or_else(|_| "unknown NVIDIA GPU".into()),
                utilization_percent: device.utilization_rates().ok().map(|u| u.gpu),
                memory_total_bytes: memory.as_ref().map(|m| m.total),
                memory_used_bytes: memory.as_ref().map(|m| m.used),
                temperature_celsius: device.temperature(TemperatureSensor::Gpu).ok(),
                // NVML reports milliwatts.
                power_watts: device
                    .power_usage()
                    .ok()
                    .map(|mw| f64::from(mw) as f32 / 1000.0),
                processes: compute_processes(&device),
            })
        })
        .collect();
    GpuTelemetry::Present {
        driver_version: nvml.sys_driver_version().ok(),
        devices,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the real sampling path. On a machine without NVIDIA (CI) this is the no-GPU
    /// path; on a GPU machine it must list at least one device with a name.
    fn resources() -> HostResources {
        HostResources {
            cpus: 2,
            memory_mib: 1024,
            pids_max: 32_768,
            gpus: 0,
            gpu_units: vec![],
            isolation: "cgroup-v1".into(),
            enforces: vec![],
        }
    }

    #[test]
    fn gpu_memory_is_summed_per_lab_by_cgroup() {
        let lab = |id: i64, user: &str, gpus: Vec<u32>| LabRecord {
            allocation_id: id,
            user: user.into(),
            checker: format!("{user}c"),
            slot: 0,
            rdp_port: 1,
            ssh_port: 2,
            limits: Default::default(),
            gpus,
            gpu_grants: vec![],
        };
        let process = |pid: u32, mib: u64| GpuProcess {
            pid,
            used_memory_bytes: Some(mib << 20),
        };
        let device = |index: u32, processes: Vec<GpuProcess>| GpuDevice {
            index,
            name: "H200".into(),
            utilization_percent: None,
            memory_total_bytes: None,
            memory_used_bytes: None,
            temperature_celsius: None,
            power_watts: None,
            processes,
        };
        let gpus = GpuTelemetry::Present {
            driver_version: None,
            devices: vec![
                device(0, vec![process(10, 100), process(11, 50)]),
                device(1, vec![process(20, 7)]),
            ],
        };
        let labs = [lab(1, "lr-a1", vec![0]), lab(2, "lr-a2", vec![1])];
        let owner = |pid: u32| match pid {
            10 | 11 => Some("lr-a1".to_owned()),
            20 => Some("lr-a2".to_owned()),
            _ => None,
        };
        let usage = lab_usage(&gpus, &labs, owner);
        assert_eq!(
            usage
                .iter()
                .map(|u| (u.allocation_id, u.gpu_memory_bytes >> 20))
                .collect::<Vec<_>>(),
            [(1, 150), (2, 7)]
        );
        let none = lab_usage(
            &GpuTelemetry::NoGpu {
                reason: "NVML unavailable".into(),
            },
            &labs,
            owner,
        );
        assert!(none.iter().all(|u| u.gpu_memory_bytes == 0));
    }

    #[test]
    fn a_sample_describes_this_host() {
        let telemetry = sample(Duration::from_millis(250), resources(), &[], |_| None);
        assert!(telemetry.cpu_count >= 1);
        assert!(
            (0.0..=100.0).contains(&telemetry.cpu_percent),
            "{}",
            telemetry.cpu_percent
        );
        assert!(
            telemetry.memory_total_bytes > 0
                && telemetry.memory_used_bytes <= telemetry.memory_total_bytes
        );
        match &telemetry.gpus {
            GpuTelemetry::NoGpu { reason } => assert!(reason.starts_with("NVML"), "{reason}"),
            GpuTelemetry::Present { devices, .. } => {
                assert!(devices.iter().all(|d| !d.name.is_empty()))
            }
        }
        let json = serde_json::to_string(&telemetry).expect("encode");
        let back: Telemetry = serde_json::from_str(&json).expect("decode");
        assert_eq!(back, telemetry);
    }
}
