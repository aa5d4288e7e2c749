//! The GPUs this host can give labs. A GPU in MIG mode is split by the driver into slices
//! (a GPU instance with a compute instance in it), each with its own memory that a lab
//! cannot exceed, so each slice is one assignable GPU; any other GPU is assigned whole,
//! and its memory is only watched (through NVML's processes) against `gpu_memory_mib`.
//!
//! Which slices exist is the host administrator's choice (`nvidia-smi mig -cgi … -C`); the
//! agent reads them at start. A lab on a slice may open its GPU's node and the two
//! `nvidia-caps` nodes that grant access to that slice alone (the driver lists their minors
//! in `/proc/driver/nvidia-caps/mig-minors`), and CUDA is pointed at the slice's UUID.

use std::collections::HashMap;

use labrack_provisioner::limits::GpuUnit;
use serde::{Deserialize, Serialize};

/// What a lab holds of one assigned GPU: the device nodes to allow and how CUDA names it.
/// Kept in the lab's record, so its box and its checks open exactly what was granted even
/// if the host's MIG layout changes later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GpuGrant {
    /// its index among the host's assignable GPUs (what the appliance records)
    pub(crate) index: u32,
    /// the NVIDIA minor of the physical GPU (`/dev/nvidiaN`)
    pub(crate) gpu_minor: u32,
    /// minors of `/dev/nvidia-caps/nvidia-capN` granting its MIG slice (empty: a whole GPU)
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) caps: Vec<u32>,
    /// its name in `CUDA_VISIBLE_DEVICES` (a `GPU-…`/`MIG-…` UUID, or the index)
    pub(crate) visible: String,
}

impl GpuGrant {
    /// A whole GPU known only by its index (`--gpus N`, or a record from before grants).
    pub(crate) fn whole(index: u32) -> Self {
        Self {
            index,
            gpu_minor: index,
            caps: Vec::new(),
            visible: index.to_string(),
        }
    }
}

/// One physical GPU as NVML describes it (plain data, so the logic runs without a GPU).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PhysicalGpu {
    pub(crate) minor: u32,
    pub(crate) uuid: Option<String>,
    pub(crate) memory_mib: u64,
    /// its MIG slices when MIG mode is on (`None`: off or unsupported)
    pub(crate) mig: Option<Vec<MigSlice>>,
}

/// One MIG device: a compute instance inside a GPU instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MigSlice {
    pub(crate) uuid: String,
    pub(crate) memory_mib: u64,
    pub(crate) gpu_instance: u32,
    pub(crate) compute_instance: u32,
}

/// The host's assignable GPUs, by index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct GpuInventory {
    units: Vec<(GpuUnit, GpuGrant)>,
}

impl GpuInventory {
    /// `count` whole GPUs `/dev/nvidia0…`, sizes unknown (`--gpus N`).
    pub(crate) fn counted(count: u32) -> Self {
        Self {
            units: (0..count)
                .map(|i| {
                    (
                        GpuUnit {
                            memory_mib: 0,
                            mig: false,
                        },
                        GpuGrant::whole(i),
                    )
                })
                .collect(),
        }
    }

    /// Whole GPUs, and the slices of GPUs in MIG mode, in NVML's order. A slice whose
    /// access nodes the driver does not list cannot be granted alone, so it is left out
    /// (with a warning) rather than given with its whole GPU. A GPU in MIG mode with no
    /// slices offers nothing.
    pub(crate) fn build(gpus: &[PhysicalGpu], mig_minors: &str) -> Self {
        let minors = parse_mig_minors(mig_minors);
        let mut units = Vec::new();
        for gpu in gpus {
            match &gpu.mig {
                None => {
                    let index = next_index(&units);
                    let visible = gpu.uuid.clone().unwrap_or_else(|| index.to_string());
                    units.push((
                        GpuUnit {
                            memory_mib: gpu.memory_mib,
                            mig: false,
                        },
                        GpuGrant {
                            index,
                            gpu_minor: gpu.minor,
                            caps: Vec::new(),
                            visible,
                        },
                    ));
                }
                Some(slices) => {
                    if slices.is_empty() {
                        tracing::warn!(
                            gpu = gpu.minor,
                            "GPU is in MIG mode with no MIG devices: labs get nothing of it (create some with nvidia-smi mig -cgi … -C)"
                        );
                    }
                    for slice in slices {
                        let gi = format!("gpu{}/gi{}/access", gpu.minor, slice.gpu_instance);
                        let ci = format!(
                            "gpu{}/gi{}/ci{}/access",
                            gpu.minor, slice.gpu_instance, slice.compute_instance
                        );
                        let (Some(gi_minor), Some(ci_minor)) = (minors.get(&gi), minors.get(&ci))
                        else {
                            tracing::warn!(gpu = gpu.minor, slice = %slice.uuid, "no nvidia-caps minors for this MIG device in /proc/driver/nvidia-caps/mig-minors: not offered to labs");
                            continue;
                        };
                        let index = next_index(&units);
                        let grant = GpuGrant {
                            index,
                            gpu_minor: gpu.minor,
                            caps: vec![*gi_minor, *ci_minor],
                            visible: slice.uuid.clone(),
                        };
                        units.push((
                            GpuUnit {
                                memory_mib: slice.memory_mib,
                                mig: true,
                            },
                            grant,
                        ));
                    }
                }
            }
        }
        Self { units }
    }

    /// Asks NVML and the driver; no NVIDIA driver is no GPUs.
    pub(crate) fn discover() -> Self {
        let minors =
            std::fs::read_to_string("/proc/driver/nvidia-caps/mig-minors").unwrap_or_default();
        Self::build(&crate::telemetry::physical_gpus(), &minors)
    }

    pub(crate) fn count(&self) -> u32 {
        u32::try_from(self.units.len()).unwrap_or(u32::MAX)
    }

    /// What the appliance is told of each (sizes, slice or whole); nothing when only
    /// counted, as sizes are unknown then.
    pub(crate) fn units(&self) -> Vec<GpuUnit> {
        if self
            .units
            .iter()
            .all(|(unit, _)| unit.memory_mib == 0 && !unit.mig)
        {
            return Vec::new();
        }
        self.units.iter().map(|(unit, _)| unit.clone()).collect()
    }

    /// The grants for the indices the appliance assigned, or which index does not exist.
    pub(crate) fn grants(&self, indices: &[u32]) -> Result<Vec<GpuGrant>, u32> {
        indices
            .iter()
            .map(|i| {
                self.units
                    .get(usize::try_from(*i).map_err(|_| *i)?)
                    .map(|(_, grant)| grant.clone())
                    .ok_or(*i)
            })
            .collect()
    }
}

fn next_index(units: &[(GpuUnit, GpuGrant)]) -> u32 {
    u32::try_from(units.len()).unwrap_or(u32::MAX)
}

/// `/proc/driver/nvidia-caps/mig-minors`: lines of `NAME MINOR`, such as
/// `gpu0/gi1/access 12` and `gpu0/gi1/ci0/access 13`.
fn parse_mig_minors(text: &str) -> HashMap<String, u32> {
    text.lines()
        .filter_map(|line| {
            let (name, minor) = line.trim().split_once(char::is_whitespace)?;
            Some((name.to_owned(), minor.trim().parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIG_MINORS: &str = "config 1\nmonitor 2\ngpu0/gi1/access 12\ngpu0/gi1/ci0/access 13\ngpu0/gi2/access 21\ngpu0/gi2/ci0/access 22\ngpu0/gi3/access 30\n";

    fn slice(uuid: &str, memory_mib: u64, gpu_instance: u32) -> MigSlice {
        MigSlice {
            uuid: uuid.into(),
            memory_mib,
            gpu_instance,
            compute_instance: 0,
        }
    }

    #[test]
    fn mig_slices_are_assignable_gpus_with_their_own_access_nodes() {
        let gpus = [
            PhysicalGpu {
                minor: 0,
                uuid: Some("GPU-a".into()),
                memory_mib: 81_559,
                mig: Some(vec![
                    slice("MIG-1", 40_192, 1),
                    slice("MIG-2", 19_968, 2),
                    slice("MIG-3", 9_856, 3),
                ]),
            },
            PhysicalGpu {
                minor: 1,
                uuid: Some("GPU-b".into()),
                memory_mib: 81_559,
                mig: None,
            },
        ];
        let inventory = GpuInventory::build(&gpus, MIG_MINORS);
        assert_eq!(
            inventory.count(),
            3,
            "slice 3 has no compute-instance node listed, so it is left out"
        );
        assert_eq!(
            inventory.units(),
            vec![
                GpuUnit {
                    memory_mib: 40_192,
                    mig: true
                },
                GpuUnit {
                    memory_mib: 19_968,
                    mig: true
                },
                GpuUnit {
                    memory_mib: 81_559,
                    mig: false
                }
            ]
        );
        let grants = inventory.grants(&[1, 2]).expect("both exist");
        assert_eq!(
            grants[0],
            GpuGrant {
                index: 1,
                gpu_minor: 0,
                caps: vec![21, 22],
                visible: "MIG-2".into()
            }
        );
        assert_eq!(
            grants[1],
            GpuGrant {
                index: 2,
                gpu_minor: 1,
                caps: vec![],
                visible: "GPU-b".into()
            }
        );
        assert_eq!(inventory.grants(&[0, 3]), Err(3));
    }

    #[test]
    fn counted_gpus_are_whole_and_unsized() {
        let inventory = GpuInventory::counted(2);
        assert_eq!(inventory.count(), 2);
        assert!(
            inventory.units().is_empty(),
            "sizes unknown: the appliance is told the count only"
        );
        assert_eq!(inventory.grants(&[1]), Ok(vec![GpuGrant::whole(1)]));
        let empty_mig = GpuInventory::build(
            &[PhysicalGpu {
                minor: 0,
                uuid: None,
                memory_mib: 1,
                mig: Some(vec![]),
            }],
            "",
        );
        assert_eq!(empty_mig.count(), 0);
    }
}
