//! What one lab may use of its host and what it may reach: the limits a template asks for,
//! what a host says it can enforce, and whether a host can take a lab. No I/O.
//!
//! A host enforces these in the lab's own cgroup (CPU quota and weight, memory, pids, IO
//! weight, device rules), its own network namespace (the network policy and allowlist) and
//! a disk image for its home (`disk_mib`). A host that cannot enforce a limit a template
//! sets says so, and placement never picks it for such a lab.

use std::fmt;

use serde::{Deserialize, Serialize};

/// CPU a lab gets unless its template says otherwise (cores).
pub const DEFAULT_CPU_MILLICORES: u32 = 2_000;
/// Relative CPU share when the host is busy.
pub const DEFAULT_CPU_WEIGHT: u32 = 100;
/// Memory a lab gets unless its template says otherwise.
pub const DEFAULT_MEMORY_MIB: u32 = 4_096;
/// Processes and threads a lab may have at once.
pub const DEFAULT_PIDS: u32 = 1_024;

/// Where a lab's processes may connect to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkPolicy {
    /// loopback only (its own), plus the allowlist
    None,
    /// the venue's private networks, never the host itself nor other labs
    Venue,
    /// anywhere but the host itself and other labs
    Internet,
}

impl NetworkPolicy {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "none" => Some(Self::None),
            "venue" => Some(Self::Venue),
            "internet" => Some(Self::Internet),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Venue => "venue",
            Self::Internet => "internet",
        }
    }
}

/// One `host:port` a lab may reach whatever its policy (a licence server, a database).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// an IP address or a DNS name (the host resolves names when it starts the lab)
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl Endpoint {
    /// Parses `10.0.0.5:5432`, `db.venue.lan:5432` or `[fd00::5]:443`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (host, port) = if let Some(rest) = text.strip_prefix('[') {
            let (host, port) = rest
                .split_once("]:")
                .ok_or_else(|| format!("{text:?}: write an IPv6 address as [ADDRESS]:PORT"))?;
            if host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(format!("{text:?}: {host:?} is not an IPv6 address"));
            }
            (host, port)
        } else {
            let (host, port) = text
                .rsplit_once(':')
                .ok_or_else(|| format!("{text:?}: write HOST:PORT"))?;
            let name_ok = !host.is_empty()
                && host.len() <= 253
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
                && !host.starts_with(['-', '.']);
            if !name_ok {
                return Err(format!(
                    "{text:?}: {host:?} is not an IP address or host name"
                ));
            }
            (host, port)
        };
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{text:?}: the port must be 1–65535"))?;
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }
}

/// The limits of one lab, as the template set them (defaults filled in).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabLimits {
    /// CPU time as a quota, in thousandths of a core (2000 = two cores)
    pub cpu_millicores: u32,
    /// relative CPU share when the host is busy (cgroup v2 `cpu.weight`, 1–10000)
    pub cpu_weight: u32,
    /// memory of every process of the lab together (page cache and tmpfs included)
    pub memory_mib: u32,
    /// processes and threads at once
    pub pids: u32,
    /// relative IO share (cgroup v2 `io.weight`, 1–10000); unset: no IO rule
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_weight: Option<u32>,
    /// the home directory's size (a disk image of its own); unset: no quota
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mib: Option<u32>,
    pub network: NetworkPolicy,
    /// reachable beyond the policy
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<Endpoint>,
}

impl Default for LabLimits {
    fn default() -> Self {
        Self {
            cpu_millicores: DEFAULT_CPU_MILLICORES,
            cpu_weight: DEFAULT_CPU_WEIGHT,
            memory_mib: DEFAULT_MEMORY_MIB,
            pids: DEFAULT_PIDS,
            io_weight: None,
            disk_mib: None,
            network: NetworkPolicy::None,
            allow: Vec::new(),
        }
    }
}

/// A limit a host may or may not be able to enforce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Enforcement {
    /// CPU quota and weight
    Cpu,
    Memory,
    Pids,
    IoWeight,
    /// device rules (which GPUs a lab may open)
    Devices,
    /// a disk quota per lab
    Disk,
    /// a network namespace and policy per lab
    Network,
}

impl Enforcement {
    /// The template field this enforcement stands for, for errors.
    pub fn field(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Memory => "memory_mib",
            Self::Pids => "pids",
            Self::IoWeight => "io_weight",
            Self::Devices => "gpus",
            Self::Disk => "disk_mib",
            Self::Network => "network",
        }
    }
}

/// What a host has and can enforce, as it reports at enrolment and with each heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostResources {
    pub cpus: u32,
    pub memory_mib: u64,
    /// the kernel's `pid_max`
    pub pids_max: u32,
    pub gpus: u32,
    /// what each of the `gpus` assignable GPUs is, by index (a whole GPU, or a MIG slice of
    /// one); empty when the host knows only their number (`--gpus N`)
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpu_units: Vec<GpuUnit>,
    /// how the host isolates labs: `cgroup-v1`, `cgroup-v2`, `cgroup-v2-systemd`
    pub isolation: String,
    pub enforces: Vec<Enforcement>,
}

/// One GPU a host can give a lab: a whole GPU, or a MIG slice of one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuUnit {
    /// its memory (0 when NVML could not tell)
    pub memory_mib: u64,
    /// a MIG slice: its memory is a hardware partition, so a lab cannot use more
    /// (`gpu_memory_mib` is enforced); on a whole GPU it is only watched
    pub mig: bool,
}

impl HostResources {
    /// The memory of GPU `index`, when the host knows it.
    pub fn gpu_memory_mib(&self, index: u32) -> Option<u64> {
        self.gpu_units
            .get(usize::try_from(index).ok()?)
            .map(|u| u.memory_mib)
            .filter(|m| *m > 0)
    }

    /// Whether GPU `index` could hold a lab that asks for `memory_mib` of GPU memory
    /// (unknown sizes could: NVML watches them).
    pub fn gpu_fits(&self, index: u32, memory_mib: Option<u64>) -> bool {
        match (memory_mib, self.gpu_memory_mib(index)) {
            (Some(needed), Some(has)) => has >= needed,
            _ => true,
        }
    }

    /// How many of its GPUs could each hold `memory_mib`.
    pub fn gpus_fitting(&self, memory_mib: Option<u64>) -> u32 {
        u32::try_from(
            (0..self.gpus)
                .filter(|i| self.gpu_fits(*i, memory_mib))
                .count(),
        )
        .unwrap_or(u32::MAX)
    }
}

/// Why a host cannot take a lab, naming the template field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Unfit {
    pub field: &'static str,
    pub message: String,
}

impl LabLimits {
    /// The enforcements these limits need from a host.
    pub fn needs(&self) -> Vec<Enforcement> {
        let mut needs = vec![
            Enforcement::Cpu,
            Enforcement::Memory,
            Enforcement::Pids,
            Enforcement::Network,
        ];
        if self.io_weight.is_some() {
            needs.push(Enforcement::IoWeight);
        }
        if self.disk_mib.is_some() {
            needs.push(Enforcement::Disk);
        }
        needs
    }

    /// Whether a host with `resources` could ever run a lab with these limits and `gpus`
    /// GPUs of at least `gpu_memory_mib` each (its size and what it enforces; not whether
    /// it has room now).
    pub fn fit(
        &self,
        gpus: u32,
        gpu_memory_mib: Option<u64>,
        resources: &HostResources,
    ) -> Result<(), Unfit> {
        if u64::from(self.cpu_millicores) > u64::from(resources.cpus) * 1000 {
            return Err(Unfit {
                field: "cpu",
                message: format!(
                    "asks for {} cores; the host has {}",
                    cores(self.cpu_millicores),
                    resources.cpus
                ),
            });
        }
        if u64::from(self.memory_mib) > resources.memory_mib {
            return Err(Unfit {
                field: "memory_mib",
                message: format!(
                    "asks for {} MiB; the host has {} MiB",
                    self.memory_mib, resources.memory_mib
                ),
            });
        }
        if self.pids > resources.pids_max {
            return Err(Unfit {
                field: "pids",
                message: format!(
                    "asks for {}; the host allows {} in all",
                    self.pids, resources.pids_max
                ),
            });
        }
        if gpus > resources.gpus {
            return Err(Unfit {
                field: "gpus",
                message: format!("asks for {gpus}; the host has {}", resources.gpus),
            });
        }
        if gpus > 0 && resources.gpus_fitting(gpu_memory_mib) < gpus {
            let largest = (0..resources.gpus)
                .filter_map(|i| resources.gpu_memory_mib(i))
                .max()
                .unwrap_or(0);
            return Err(Unfit {
                field: "gpu_memory_mib",
                message: format!(
                    "asks for {} MiB on each of {gpus} GPU(s); the host's largest GPU has {largest} MiB",
                    gpu_memory_mib.unwrap_or(0)
                ),
            });
        }
        // NVIDIA's device nodes are world-writable: on a host with GPUs, every lab needs
        // device rules, or it could open them all.
        if resources.gpus > 0 && !resources.enforces.contains(&Enforcement::Devices) {
            return Err(Unfit {
                field: "gpus",
                message: format!(
                    "the host cannot restrict GPU devices ({} isolation)",
                    resources.isolation
                ),
            });
        }
        for need in self.needs() {
            if !resources.enforces.contains(&need) {
                return Err(Unfit {
                    field: need.field(),
                    message: format!(
                        "the host cannot enforce it ({} isolation)",
                        resources.isolation
                    ),
                });
            }
        }
        Ok(())
    }
}

/// Whether *some* host of `hosts` is big enough for each field and can enforce each limit:
/// a template that fails this can never be placed. Compared field by field against the
/// largest host, so the error names the field that no host can meet.
pub fn fits_some_host(
    limits: &LabLimits,
    gpus: u32,
    gpu_memory_mib: Option<u64>,
    hosts: &[HostResources],
) -> Result<(), Unfit> {
    if hosts.is_empty() {
        return Ok(());
    }
    let largest = HostResources {
        cpus: hosts.iter().map(|h| h.cpus).max().unwrap_or(0),
        memory_mib: hosts.iter().map(|h| h.memory_mib).max().unwrap_or(0),
        pids_max: hosts.iter().map(|h| h.pids_max).max().unwrap_or(0),
        gpus: hosts.iter().map(|h| h.gpus).max().unwrap_or(0),
        // GPU sizes are compared below, host by host: a big GPU on one host and many on
        // another do not make one host that fits
        gpu_units: Vec::new(),
        isolation: "any host's".to_owned(),
        enforces: {
            let mut all: Vec<Enforcement> = hosts
                .iter()
                .flat_map(|h| h.enforces.iter().copied())
                .collect();
            all.sort();
            all.dedup();
            all
        },
    };
    limits.fit(gpus, None, &largest).map_err(|unfit| Unfit {
        message: unfit
            .message
            .replace("the host has", "the largest host has"),
        ..unfit
    })?;
    if gpus > 0 && !hosts.iter().any(|h| h.gpus_fitting(gpu_memory_mib) >= gpus) {
        let largest = hosts
            .iter()
            .flat_map(|h| (0..h.gpus).filter_map(|i| h.gpu_memory_mib(i)))
            .max()
            .unwrap_or(0);
        return Err(Unfit {
            field: "gpu_memory_mib",
            message: format!(
                "asks for {} MiB on each of {gpus} GPU(s); no host has that many GPUs that large (the largest has {largest} MiB)",
                gpu_memory_mib.unwrap_or(0)
            ),
        });
    }
    Ok(())
}

/// `2000` → `"2"`, `500` → `"0.5"`.
pub fn cores(millicores: u32) -> String {
    if millicores.is_multiple_of(1000) {
        format!("{}", millicores / 1000)
    } else {
        format!("{}", f64::from(millicores) / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostResources {
        HostResources {
            cpus: 8,
            memory_mib: 32_000,
            pids_max: 4_194_304,
            gpus: 2,
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

    #[test]
    fn gpu_memory_is_compared_with_each_gpu_and_named_when_no_gpu_is_large_enough() {
        let unit = |memory_mib: u64, mig: bool| GpuUnit { memory_mib, mig };
        // one H100 split into a 40 GB slice and two 20 GB slices
        let mig = HostResources {
            gpus: 3,
            gpu_units: vec![unit(40_000, true), unit(20_000, true), unit(20_000, true)],
            ..host()
        };
        let limits = LabLimits::default();
        assert_eq!(limits.fit(1, Some(30_000), &mig), Ok(()));
        assert_eq!(limits.fit(2, Some(20_000), &mig), Ok(()));
        let unfit = limits
            .fit(2, Some(30_000), &mig)
            .expect_err("only one slice holds 30 GB");
        assert_eq!(unfit.field, "gpu_memory_mib");
        assert!(unfit.message.contains("40000 MiB"), "{unfit}");
        assert_eq!(mig.gpus_fitting(Some(20_000)), 3);
        assert_eq!(mig.gpus_fitting(None), 3);
        // sizes unknown (--gpus N): NVML watches instead, so they fit
        assert_eq!(limits.fit(2, Some(80_000), &host()), Ok(()));
        // across hosts, one host must hold all of a lab's GPUs
        let small_many = HostResources {
            gpus: 4,
            gpu_units: vec![unit(10_000, false); 4],
            ..host()
        };
        let big_one = HostResources {
            gpus: 1,
            gpu_units: vec![unit(80_000, false)],
            ..host()
        };
        let hosts = [small_many, big_one];
        assert_eq!(fits_some_host(&limits, 1, Some(60_000), &hosts), Ok(()));
        assert_eq!(fits_some_host(&limits, 3, Some(8_000), &hosts), Ok(()));
        let unfit = fits_some_host(&limits, 2, Some(60_000), &hosts)
            .expect_err("no host has two 60 GB GPUs");
        assert_eq!(unfit.field, "gpu_memory_mib");
        assert!(unfit.message.contains("80000 MiB"), "{unfit}");
    }

    #[test]
    fn endpoints_parse_strictly() {
        assert_eq!(
            Endpoint::parse("10.0.0.5:5432"),
            Ok(Endpoint {
                host: "10.0.0.5".into(),
                port: 5432
            })
        );
        assert_eq!(
            Endpoint::parse("db.venue.lan:80").map(|e| e.to_string()),
            Ok("db.venue.lan:80".into())
        );
        assert_eq!(
            Endpoint::parse("[fd00::5]:443").map(|e| e.to_string()),
            Ok("[fd00::5]:443".into())
        );
        for bad in [
            "10.0.0.5",
            "10.0.0.5:0",
            "10.0.0.5:99999",
            ":80",
            "a b:80",
            "[zz]:1",
            "-x:1",
            "fd00::5:443",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_host_fits_a_lab_or_names_the_field_that_does_not() {
        let limits = LabLimits::default();
        assert_eq!(limits.fit(1, None, &host()), Ok(()));
        let big = LabLimits {
            cpu_millicores: 9_000,
            ..LabLimits::default()
        };
        assert_eq!(big.fit(0, None, &host()).map_err(|e| e.field), Err("cpu"));
        let big = LabLimits {
            memory_mib: 64_000,
            ..LabLimits::default()
        };
        assert_eq!(
            big.fit(0, None, &host()).map_err(|e| e.field),
            Err("memory_mib")
        );
        assert_eq!(
            limits.fit(3, None, &host()).map_err(|e| e.field),
            Err("gpus")
        );
        let quota = LabLimits {
            disk_mib: Some(1024),
            ..LabLimits::default()
        };
        let unfit = quota.fit(0, None, &host()).expect_err("no disk quota here");
        assert_eq!(unfit.field, "disk_mib");
        assert!(unfit.message.contains("cannot enforce"), "{unfit}");
        let io = LabLimits {
            io_weight: Some(200),
            ..LabLimits::default()
        };
        assert_eq!(
            io.fit(0, None, &host()).map_err(|e| e.field),
            Err("io_weight")
        );
        assert_eq!(cores(500), "0.5");
    }

    #[test]
    fn some_host_must_meet_each_field() {
        let small = HostResources {
            cpus: 2,
            memory_mib: 8_000,
            ..host()
        };
        let hosts = [small, host()];
        assert_eq!(
            fits_some_host(
                &LabLimits {
                    cpu_millicores: 8_000,
                    ..LabLimits::default()
                },
                0,
                None,
                &hosts
            ),
            Ok(()),
            "the big host fits"
        );
        let unfit = fits_some_host(
            &LabLimits {
                memory_mib: 40_000,
                ..LabLimits::default()
            },
            0,
            None,
            &hosts,
        )
        .expect_err("too big for all");
        assert_eq!(unfit.field, "memory_mib");
        assert!(
            unfit.message.contains("largest host has 32000 MiB"),
            "{unfit}"
        );
        assert_eq!(
            fits_some_host(&LabLimits::default(), 4, None, &hosts).map_err(|e| e.field),
            Err("gpus")
        );
        assert_eq!(
            fits_some_host(
                &LabLimits {
                    memory_mib: 1 << 30,
                    ..LabLimits::default()
                },
                0,
                None,
                &[]
            ),
            Ok(()),
            "no hosts yet: nothing to compare"
        );
        let no_devices = HostResources {
            enforces: vec![
                Enforcement::Cpu,
                Enforcement::Memory,
                Enforcement::Pids,
                Enforcement::Network,
            ],
            ..host()
        };
        assert_eq!(
            LabLimits::default()
                .fit(0, None, &no_devices)
                .map_err(|e| e.field),
            Err("gpus"),
            "a GPU host without device rules takes no lab"
        );
    }
}
