//! Host inventory and placement: which enrolled host gets a new lab.

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
    /// GPUs claimed by its labs that are not released
    pub gpus_in_use: u32,
}

impl HostSlot {
    fn free_labs(&self) -> u32 {
        self.capacity.saturating_sub(self.labs_in_use)
    }

    fn free_gpus(&self) -> u32 {
        self.gpus.saturating_sub(self.gpus_in_use)
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
    #[error("no healthy lab host has {needed} free GPU(s)")]
    NotEnoughGpus { needed: u32 },
}

/// Picks the healthy host with room for one more lab and `gpus_needed` free GPUs, preferring
/// the most free lab slots, then the fewest spare GPUs (keep big GPU hosts for GPU labs),
/// then the lowest id, so placement is deterministic.
pub fn place(hosts: &[HostSlot], gpus_needed: u32) -> Result<i64, PlacementError> {
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
    with_room
        .into_iter()
        .filter(|h| h.free_gpus() >= gpus_needed)
        .max_by(|a, b| {
            a.free_labs()
                .cmp(&b.free_labs())
                .then_with(|| b.free_gpus().cmp(&a.free_gpus()))
                .then_with(|| b.host_id.cmp(&a.host_id))
        })
        .map(|h| h.host_id)
        .ok_or(PlacementError::NotEnoughGpus { needed: gpus_needed })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(host_id: i64, capacity: u32, labs_in_use: u32, gpus: u32, gpus_in_use: u32) -> HostSlot {
        HostSlot { host_id, healthy: true, capacity, labs_in_use, gpus, gpus_in_use }
    }

    #[test]
    fn places_by_free_capacity_and_gpu_need() {
        let hosts = [slot(1, 4, 3, 0, 0), slot(2, 4, 1, 2, 1), slot(3, 4, 1, 8, 0)];
        assert_eq!(place(&hosts, 0), Ok(2), "most free slots, then fewest spare GPUs");
        assert_eq!(place(&hosts, 2), Ok(3), "only host 3 has two free GPUs");
        assert_eq!(place(&hosts, 9), Err(PlacementError::NotEnoughGpus { needed: 9 }));
    }

    #[test]
    fn unhealthy_and_full_hosts_are_skipped_with_a_reason() {
        assert_eq!(place(&[], 0), Err(PlacementError::NoHosts));
        let mut sick = slot(1, 4, 0, 1, 0);
        sick.healthy = false;
        assert_eq!(place(std::slice::from_ref(&sick), 0), Err(PlacementError::NoHealthyHost));
        assert_eq!(place(&[sick.clone(), slot(2, 2, 2, 0, 0)], 0), Err(PlacementError::Full));
        assert_eq!(place(&[sick, slot(2, 2, 2, 0, 0), slot(3, 1, 0, 0, 0)], 0), Ok(3));
        assert_eq!(place(&[slot(5, 2, 0, 0, 0), slot(4, 2, 0, 0, 0)], 0), Ok(4), "ties go to the lowest id");
    }
}
