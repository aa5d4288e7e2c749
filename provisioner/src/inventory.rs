//! Host inventory and placement: which enrolled host gets a new lab.

use crate::limits::{HostResources, LabLimits, Unfit};

/// What placement needs to know about one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSlot {
    pub host_id: i64,
    pub healthy: bool,
    /// labs the host may run at once
    pub capacity: u32,
    /// labs on it that are not released
    pub labs_in_use: u32,
    pub gpus: u32,
    /// GPU indices held by its labs that are not released
    pub gpus_held: Vec<u32>,
    /// what it last said it has and can enforce (`None` before its first report)
    pub resources: Option<HostResources>,
}

impl HostSlot {
    fn free_labs(&self) -> u32 {
        self.capacity.saturating_sub(self.labs_in_use)
    }

    /// Its GPUs not held by a lab that could each hold `memory_mib`.
    fn free_gpus(&self, memory_mib: Option<u64>) -> Vec<u32> {
        (0..self.gpus)
            .filter(|i| !self.gpus_held.contains(i))
            .filter(|i| {
                self.resources
                    .as_ref()
                    .is_none_or(|r| r.gpu_fits(*i, memory_mib))
            })
            .collect()
    }

    fn fit(&self, limits: &LabLimits, gpus: u32, gpu_memory_mib: Option<u64>) -> Result<(), Unfit> {
        match &self.resources {
            Some(resources) => limits.fit(gpus, gpu_memory_mib, resources),
            None => Err(Unfit {
                field: "host",
                message: "the host has not said yet what it can enforce".into(),
            }),
        }
    }
}

/// Why no host could take a lab.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("no lab host is enrolled")]
    NoHosts,
    #[error("no healthy lab host is available")]
    NoHealthyHost,
    #[error("every healthy lab host is full")]
    Full,
    /// hosts with room exist, but none is big enough or enforces what the template asks
    #[error("no healthy lab host with room can run it: {0}")]
    Unfit(Unfit),
    #[error("no healthy lab host has {needed} free GPU(s){}", memory_mib.map(|m| format!(" with {m} MiB")).unwrap_or_default())]
    NotEnoughGpus {
        needed: u32,
        memory_mib: Option<u64>,
    },
}

/// Where a lab goes: the host and the GPU indices it gets there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub host_id: i64,
    pub gpus: Vec<u32>,
}

/// `n` of `free` (indices of GPUs that each fit), in index order. With a memory need the
/// smallest GPUs that fit go first, so a MIG slice of the right size is used before a
/// bigger one; otherwise the lowest indices.
pub fn assign_gpus(
    free: &[u32],
    resources: Option<&HostResources>,
    n: u32,
    memory_mib: Option<u64>,
) -> Option<Vec<u32>> {
    let mut order = free.to_vec();
    if memory_mib.is_some() {
        order.sort_by_key(|i| {
            (
                resources
                    .and_then(|r| r.gpu_memory_mib(*i))
                    .unwrap_or(u64::MAX),
                *i,
            )
        });
    }
    let mut chosen: Vec<u32> = order
        .into_iter()
        .take(usize::try_from(n).unwrap_or(usize::MAX))
        .collect();
    chosen.sort_unstable();
    (u32::try_from(chosen.len()).ok()? == n).then_some(chosen)
}

/// Picks the healthy host with room for one more lab, that can run `limits`, with
/// `gpus_needed` free GPUs of at least `gpu_memory_mib` each, preferring the most free lab
/// slots, then the fewest spare GPUs (keep big GPU hosts for GPU labs), then the lowest
/// id, so placement is deterministic; and gives the lab GPUs there by [`assign_gpus`].
pub fn place(
    hosts: &[HostSlot],
    limits: &LabLimits,
    gpus_needed: u32,
    gpu_memory_mib: Option<u64>,
) -> Result<Placement, PlacementError> {
    if hosts.is_empty() {
        return Err(PlacementError::NoHosts);
    }
    let healthy: Vec<&HostSlot> = hosts.iter().filter(|h| h.healthy).collect();
    if healthy.is_empty() {
        return Err(PlacementError::NoHealthyHost);
    }
    let with_room: Vec<&HostSlot> = healthy.into_iter().filter(|h| h.free_labs() > 0).collect();
    if with_room.is_empty() {
        return Err(PlacementError::Full);
    }
    let mut unfit = None;
    let able: Vec<&HostSlot> = with_room
        .into_iter()
        .filter(|h| match h.fit(limits, gpus_needed, gpu_memory_mib) {
            Ok(()) => true,
            Err(why) => {
                unfit.get_or_insert(why);
                false
            }
        })
        .collect();
    if able.is_empty() {
        return Err(PlacementError::Unfit(unfit.unwrap_or(Unfit {
            field: "template",
            message: "no host fits".into(),
        })));
    }
    let not_enough = PlacementError::NotEnoughGpus {
        needed: gpus_needed,
        memory_mib: gpu_memory_mib,
    };
    let (host, free) = able
        .into_iter()
        .map(|h| (h, h.free_gpus(gpu_memory_mib)))
        .filter(|(_, free)| free.len() >= usize::try_from(gpus_needed).unwrap_or(usize::MAX))
        .max_by(|(a, a_free), (b, b_free)| {
            a.free_labs()
                .cmp(&b.free_labs())
                .then_with(|| b_free.len().cmp(&a_free.len()))
                .then_with(|| b.host_id.cmp(&a.host_id))
        })
        .ok_or_else(|| not_enough.clone())?;
    let gpus = assign_gpus(&free, host.resources.as_ref(), gpus_needed, gpu_memory_mib)
        .ok_or(not_enough)?;
    Ok(Placement {
        host_id: host.host_id,
        gpus,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Enforcement;

    fn resources(gpus: u32) -> HostResources {
        HostResources {
            cpus: 8,
            memory_mib: 32_000,
            pids_max: 4_194_304,
            gpus,
            gpu_units: vec![],
            isolation: "cgroup-v1".into(),
            enforces: vec![
                Enforcement::Cpu,
                Enforcement::Memory,
                Enforcement::Pids,
                Enforcement::Devices,
                Enforcement::Network,
            ],
        }
    }

    fn slot(
        host_id: i64,
        capacity: u32,
        labs_in_use: u32,
        gpus: u32,
        gpus_held: &[u32],
    ) -> HostSlot {
        HostSlot {
            host_id,
            healthy: true,
            capacity,
            labs_in_use,
            gpus,
            gpus_held: gpus_held.to_vec(),
            resources: Some(resources(gpus)),
        }
    }

    fn host_of(placed: Result<Placement, PlacementError>) -> Result<i64, PlacementError> {
        placed.map(|p| p.host_id)
    }

    #[test]
    fn places_by_free_capacity_and_gpu_need() {
        let limits = LabLimits::default();
        let hosts = [
            slot(1, 4, 3, 0, &[]),
            slot(2, 4, 1, 2, &[0]),
            slot(3, 4, 1, 8, &[]),
        ];
        assert_eq!(
            host_of(place(&hosts, &limits, 0, None)),
            Ok(2),
            "most free slots, then fewest spare GPUs"
        );
        assert_eq!(
            place(&hosts, &limits, 2, None),
            Ok(Placement {
                host_id: 3,
                gpus: vec![0, 1]
            }),
            "only host 3 has two free GPUs"
        );
        assert_eq!(
            place(&hosts, &limits, 1, None),
            Ok(Placement {
                host_id: 2,
                gpus: vec![1]
            }),
            "GPU 0 of host 2 is held"
        );
        assert_eq!(
            host_of(place(&hosts, &limits, 9, None)),
            Err(PlacementError::Unfit(Unfit {
                field: "gpus",
                message: "asks for 9; the host has 0".into()
            }))
        );
    }

    #[test]
    fn gpu_indices_are_the_lowest_free_ones() {
        assert_eq!(slot(1, 4, 0, 4, &[0, 2]).free_gpus(None), vec![1, 3]);
        assert_eq!(assign_gpus(&[1, 3], None, 2, None), Some(vec![1, 3]));
        assert_eq!(assign_gpus(&[1, 3], None, 3, None), None);
        assert_eq!(assign_gpus(&[], None, 0, None), Some(vec![]));
    }

    #[test]
    fn gpu_memory_picks_the_smallest_slices_that_fit() {
        use crate::limits::GpuUnit;
        let limits = LabLimits::default();
        // a MIG host: slices of 40, 10, 20 and 10 GB; and a host whose GPU sizes are unknown
        let mut mig = slot(1, 4, 0, 4, &[]);
        if let Some(r) = mig.resources.as_mut() {
            r.gpu_units = [40_000, 10_000, 20_000, 10_000]
                .into_iter()
                .map(|memory_mib| GpuUnit {
                    memory_mib,
                    mig: true,
                })
                .collect();
        }
        assert_eq!(
            place(std::slice::from_ref(&mig), &limits, 1, Some(15_000)),
            Ok(Placement {
                host_id: 1,
                gpus: vec![2]
            }),
            "20 GB, not 40"
        );
        assert_eq!(
            place(std::slice::from_ref(&mig), &limits, 2, Some(10_000)),
            Ok(Placement {
                host_id: 1,
                gpus: vec![1, 3]
            })
        );
        assert_eq!(
            place(std::slice::from_ref(&mig), &limits, 1, None),
            Ok(Placement {
                host_id: 1,
                gpus: vec![0]
            }),
            "no need: lowest index"
        );
        mig.gpus_held = vec![0];
        assert_eq!(
            place(std::slice::from_ref(&mig), &limits, 1, Some(30_000)),
            Err(PlacementError::NotEnoughGpus {
                needed: 1,
                memory_mib: Some(30_000)
            }),
            "the only 40 GB slice is held"
        );
        let unknown = slot(2, 4, 0, 1, &[]);
        assert_eq!(
            place(&[mig.clone(), unknown], &limits, 1, Some(30_000)),
            Ok(Placement {
                host_id: 2,
                gpus: vec![0]
            }),
            "unknown sizes are watched, not refused"
        );
        let Err(PlacementError::Unfit(unfit)) = place(&[mig], &limits, 1, Some(50_000)) else {
            panic!("no slice holds 50 GB")
        };
        assert_eq!(unfit.field, "gpu_memory_mib");
    }

    #[test]
    fn unhealthy_full_and_unfit_hosts_are_skipped_with_a_reason() {
        let limits = LabLimits::default();
        assert_eq!(
            host_of(place(&[], &limits, 0, None)),
            Err(PlacementError::NoHosts)
        );
        let mut sick = slot(1, 4, 0, 1, &[]);
        sick.healthy = false;
        assert_eq!(
            host_of(place(std::slice::from_ref(&sick), &limits, 0, None)),
            Err(PlacementError::NoHealthyHost)
        );
        assert_eq!(
            host_of(place(
                &[sick.clone(), slot(2, 2, 2, 0, &[])],
                &limits,
                0,
                None
            )),
            Err(PlacementError::Full)
        );
        assert_eq!(
            host_of(place(
                &[sick, slot(2, 2, 2, 0, &[]), slot(3, 1, 0, 0, &[])],
                &limits,
                0,
                None
            )),
            Ok(3)
        );
        assert_eq!(
            host_of(place(
                &[slot(5, 2, 0, 0, &[]), slot(4, 2, 0, 0, &[])],
                &limits,
                0,
                None
            )),
            Ok(4),
            "ties go to the lowest id"
        );
        let quota = LabLimits {
            disk_mib: Some(1024),
            ..LabLimits::default()
        };
        let Err(PlacementError::Unfit(unfit)) = place(&[slot(1, 4, 0, 0, &[])], &quota, 0, None)
        else {
            panic!("no host enforces disk_mib")
        };
        assert_eq!(unfit.field, "disk_mib");
        let mut able = slot(2, 4, 0, 0, &[]);
        if let Some(resources) = able.resources.as_mut() {
            resources.enforces.push(Enforcement::Disk);
        }
        assert_eq!(
            host_of(place(&[slot(1, 4, 0, 0, &[]), able], &quota, 0, None)),
            Ok(2),
            "only the host that can enforce the quota"
        );
        let mut silent = slot(1, 4, 0, 0, &[]);
        silent.resources = None;
        assert!(matches!(
            place(&[silent], &limits, 0, None),
            Err(PlacementError::Unfit(Unfit { field: "host", .. }))
        ));
    }
}
