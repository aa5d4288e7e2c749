//! The devices a lab may open: the ordinary ones every Linux program needs, and only the
//! GPUs assigned to it. Everything else (other GPUs, disks, `/dev/mem`, …) is denied by the
//! lab's cgroup, whatever the node's file mode says — NVIDIA's nodes are world-writable.

use super::gpus::GpuGrant;

/// One allowed device (or a whole major number).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeviceRule {
    pub(crate) major: u32,
    /// `None`: every minor of the major
    pub(crate) minor: Option<u32>,
    /// the name in `/proc/devices`, for systemd's `char-NAME` form of a whole major
    pub(crate) name: Option<&'static str>,
}

impl DeviceRule {
    pub(crate) fn char(major: u32, minor: Option<u32>) -> Self {
        Self {
            major,
            minor,
            name: None,
        }
    }

    /// The cgroup v1 `devices.allow` line.
    pub(crate) fn v1(&self) -> String {
        match self.minor {
            Some(minor) => format!("c {}:{minor} rwm", self.major),
            None => format!("c {}:* rwm", self.major),
        }
    }

    /// systemd's `DeviceAllow=` value.
    pub(crate) fn systemd(&self) -> String {
        match (self.minor, self.name) {
            // systemd reads /dev/char/MAJOR:MINOR as numbers, whether or not the node exists
            (Some(minor), _) => format!("/dev/char/{}:{minor} rw", self.major),
            (None, Some(name)) => format!("char-{name} rw"),
            (None, None) => format!("char-{} rw", self.major),
        }
    }
}

/// NVIDIA's device major (`/dev/nvidia0` is 195:0, `/dev/nvidiactl` 195:255).
pub(crate) const NVIDIA_MAJOR: u32 = 195;

/// What every lab may open: null, zero, full, random, urandom, tty, console, ptmx, the
/// pseudo-terminals (its own devpts instance) and fuse (desktops mount with it).
pub(crate) fn base_rules() -> Vec<DeviceRule> {
    let mut rules: Vec<DeviceRule> = [
        (1, 3),
        (1, 5),
        (1, 7),
        (1, 8),
        (1, 9),
        (5, 0),
        (5, 1),
        (5, 2),
        (10, 229),
    ]
    .into_iter()
    .map(|(major, minor)| DeviceRule::char(major, Some(minor)))
    .collect();
    rules.push(DeviceRule {
        major: 136,
        minor: None,
        name: Some("pts"),
    });
    rules
}

/// The base rules plus the assigned GPUs and the NVIDIA control nodes they need
/// (`nvidiactl`, `nvidia-modeset`, `nvidia-uvm` and `nvidia-uvm-tools`, whose major is
/// dynamic and read from `/proc/devices`); for a MIG slice, its GPU's node and the
/// `nvidia-caps` nodes of that slice alone.
pub(crate) fn lab_rules(gpus: &[GpuGrant], proc_devices: &str) -> Vec<DeviceRule> {
    let mut rules = base_rules();
    if gpus.is_empty() {
        return rules;
    }
    let caps_major = major_of(proc_devices, "nvidia-caps");
    for gpu in gpus {
        let node = DeviceRule::char(NVIDIA_MAJOR, Some(gpu.gpu_minor));
        if !rules.contains(&node) {
            rules.push(node);
        }
        for cap in &gpu.caps {
            match caps_major {
                Some(major) => rules.push(DeviceRule::char(major, Some(*cap))),
                // without the caps nodes a slice cannot be opened: the lab sees no GPU,
                // which is safe, and the warning says why
                None => tracing::warn!(
                    gpu = gpu.index,
                    "no nvidia-caps major in /proc/devices: the MIG slice cannot be opened"
                ),
            }
        }
    }
    rules.push(DeviceRule::char(NVIDIA_MAJOR, Some(255)));
    rules.push(DeviceRule::char(NVIDIA_MAJOR, Some(254)));
    if let Some(uvm) = major_of(proc_devices, "nvidia-uvm") {
        rules.push(DeviceRule::char(uvm, Some(0)));
        rules.push(DeviceRule::char(uvm, Some(1)));
    }
    rules
}

/// The character-device major named `name` in `/proc/devices`.
fn major_of(proc_devices: &str, name: &str) -> Option<u32> {
    proc_devices
        .lines()
        .skip_while(|l| !l.starts_with("Character devices"))
        .take_while(|l| !l.starts_with("Block devices"))
        .find_map(|l| {
            let (major, found) = l.trim().split_once(' ')?;
            (found.trim() == name).then(|| major.parse().ok()).flatten()
        })
}

/// `CUDA_VISIBLE_DEVICES` / `NVIDIA_VISIBLE_DEVICES` for the assigned GPUs (`none` when a
/// lab has none, so CUDA finds nothing rather than everything).
pub(crate) fn visible_devices(gpus: &[GpuGrant]) -> String {
    if gpus.is_empty() {
        "none".to_owned()
    } else {
        gpus.iter()
            .map(|g| g.visible.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROC_DEVICES: &str = "Character devices:\n  1 mem\n  4 tty\n195 nvidia\n236 nvidia-uvm\n237 nvidia-caps\n\nBlock devices:\n  7 loop\n236 nvidia-uvm\n";

    fn whole(indices: &[u32]) -> Vec<GpuGrant> {
        indices.iter().map(|i| GpuGrant::whole(*i)).collect()
    }

    #[test]
    fn a_mig_slice_opens_its_gpu_and_only_its_own_access_nodes() {
        let slice = |index: u32, caps: Vec<u32>| GpuGrant {
            index,
            gpu_minor: 0,
            caps,
            visible: format!("MIG-{index}"),
        };
        let rules: Vec<String> = lab_rules(
            &[slice(0, vec![12, 13]), slice(1, vec![21, 22])],
            PROC_DEVICES,
        )
        .iter()
        .map(DeviceRule::v1)
        .collect();
        for wanted in [
            "c 195:0 rwm",
            "c 237:12 rwm",
            "c 237:13 rwm",
            "c 237:21 rwm",
            "c 195:255 rwm",
        ] {
            assert!(rules.contains(&wanted.to_owned()), "{wanted}: {rules:?}");
        }
        assert_eq!(
            rules.iter().filter(|r| *r == "c 195:0 rwm").count(),
            1,
            "the GPU node once: {rules:?}"
        );
        let one: Vec<String> = lab_rules(&[slice(1, vec![21, 22])], PROC_DEVICES)
            .iter()
            .map(DeviceRule::v1)
            .collect();
        assert!(
            !one.iter()
                .any(|r| r == "c 237:12 rwm" || r == "c 237:1 rwm" || r == "c 237:2 rwm"),
            "not another slice, nor config/monitor: {one:?}"
        );
        assert_eq!(visible_devices(&[slice(1, vec![21, 22])]), "MIG-1");
    }

    #[test]
    fn a_lab_gets_its_own_gpus_and_the_control_nodes() {
        let rules: Vec<String> = lab_rules(&whole(&[1, 3]), PROC_DEVICES)
            .iter()
            .map(DeviceRule::v1)
            .collect();
        assert!(
            rules.contains(&"c 195:1 rwm".to_owned()) && rules.contains(&"c 195:3 rwm".to_owned())
        );
        assert!(
            !rules.contains(&"c 195:0 rwm".to_owned())
                && !rules.contains(&"c 195:2 rwm".to_owned()),
            "{rules:?}"
        );
        assert!(
            rules.contains(&"c 195:255 rwm".to_owned())
                && rules.contains(&"c 236:0 rwm".to_owned()),
            "{rules:?}"
        );
        assert!(rules.contains(&"c 136:* rwm".to_owned()));
        let none: Vec<String> = lab_rules(&[], PROC_DEVICES)
            .iter()
            .map(DeviceRule::v1)
            .collect();
        assert!(
            none.iter().all(|r| !r.starts_with("c 195:")),
            "no NVIDIA node without a GPU: {none:?}"
        );
        assert_eq!(visible_devices(&whole(&[1, 3])), "1,3");
        assert_eq!(visible_devices(&[]), "none");
    }

    #[test]
    fn systemd_names_devices_by_number_or_group() {
        assert_eq!(
            DeviceRule::char(195, Some(1)).systemd(),
            "/dev/char/195:1 rw"
        );
        assert_eq!(
            base_rules().last().map(DeviceRule::systemd).as_deref(),
            Some("char-pts rw")
        );
    }
}
