//! Host telemetry: CPU, memory and disks via sysinfo; GPUs via NVML (nvml-wrapper), which
//! is loaded at run time. Without an NVIDIA driver NVML fails to load: that is reported as
//! `NoGpu` with the reason, once, not as an error.

use std::time::Duration;

use labrack_provisioner::protocol::{DiskUsage, GpuDevice, GpuProcess, GpuTelemetry, PROTOCOL_VERSION, Telemetry};
use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::enums::device::UsedGpuMemory;

/// Samples the host once; CPU use is measured over `interval`.
pub(crate) fn sample(interval: Duration) -> Telemetry {
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
    Telemetry {
        version: PROTOCOL_VERSION,
        cpu_percent: system.global_cpu_usage(),
        cpu_count: u32::try_from(system.cpus().len()).unwrap_or(u32::MAX),
        memory_total_bytes: system.total_memory(),
        memory_used_bytes: system.used_memory(),
        disks,
        gpus: gpus(),
    }
}

/// GPU telemetry; each NVML query that a device does not support is left `None`.
pub(crate) fn gpus() -> GpuTelemetry {
    let nvml = match Nvml::init() {
        Ok(nvml) => nvml,
        Err(error) => return GpuTelemetry::NoGpu { reason: format!("NVML unavailable: {error}") },
    };
    let count = match nvml.device_count() {
        Ok(count) => count,
        Err(error) => return GpuTelemetry::NoGpu { reason: format!("NVML device count failed: {error}") },
    };
    let devices = (0..count)
        .filter_map(|index| {
            let device = nvml.device_by_index(index).ok()?;
            let memory = device.memory_info().ok();
            Some(GpuDevice {
                index,
                name: device.name().unwrap_or_else(|_| "unknown NVIDIA GPU".into()),
                utilization_percent: device.utilization_rates().ok().map(|u| u.gpu),
                memory_total_bytes: memory.as_ref().map(|m| m.total),
                memory_used_bytes: memory.as_ref().map(|m| m.used),
                temperature_celsius: device.temperature(TemperatureSensor::Gpu).ok(),
                // NVML reports milliwatts.
                power_watts: device.power_usage().ok().map(|mw| f64::from(mw) as f32 / 1000.0),
                processes: device
                    .running_compute_processes()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|p| GpuProcess {
                        pid: p.pid,
                        used_memory_bytes: match p.used_gpu_memory {
                            UsedGpuMemory::Used(bytes) => Some(bytes),
                            UsedGpuMemory::Unavailable => None,
                        },
                    })
                    .collect(),
            })
        })
        .collect();
    GpuTelemetry::Present { driver_version: nvml.sys_driver_version().ok(), devices }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the real sampling path. On a machine without NVIDIA (CI) this is the no-GPU
    /// path; on a GPU machine it must list at least one device with a name.
    #[test]
    fn a_sample_describes_this_host() {
        let telemetry = sample(Duration::from_millis(250));
        assert!(telemetry.cpu_count >= 1);
        assert!((0.0..=100.0).contains(&telemetry.cpu_percent), "{}", telemetry.cpu_percent);
        assert!(telemetry.memory_total_bytes > 0 && telemetry.memory_used_bytes <= telemetry.memory_total_bytes);
        match &telemetry.gpus {
            GpuTelemetry::NoGpu { reason } => assert!(reason.starts_with("NVML"), "{reason}"),
            GpuTelemetry::Present { devices, .. } => assert!(devices.iter().all(|d| !d.name.is_empty())),
        }
        let json = serde_json::to_string(&telemetry).expect("encode");
        let back: Telemetry = serde_json::from_str(&json).expect("decode");
        assert_eq!(back, telemetry);
    }
}
