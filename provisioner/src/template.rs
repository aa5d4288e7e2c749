//! Lab templates: what a lab is made of (desktop runtime, GPU need, home skeleton, checks).
//! Organizers write them in TOML; every error names its line, and a file with any error
//! yields no templates.
//!
//! ```toml
//! [[template]]
//! name = "gpu-desktop"
//! runtime = "local-user"
//! gpus = 1
//! gpu_memory_mib = 16000  # watched (NVML) or enforced (MIG); over it, staff are alerted
//! skeleton = "/var/lib/labrack-host/skeletons/gpu-desktop"  # under the host's skeleton root
//! cpu = 4                 # cores' worth of CPU time (fractions allowed); default 2
//! cpu_weight = 100        # share when the host is busy, 1–10000; default 100
//! memory_mib = 8192       # every process of the lab together; default 4096
//! pids = 2048             # processes and threads at once; default 1024
//! io_weight = 100         # optional: IO share, 1–10000 (hosts with an IO weight only)
//! disk_mib = 20480        # optional: the home's size, a quota of its own
//! network = "venue"       # none | venue | internet; default none
//! allow = ["10.0.0.5:5432"]  # reachable whatever the policy
//!
//! [[template.check]]
//! name = "web server answers"
//! script = "curl -fsS http://localhost:8080/"
//! timeout_secs = 30
//! weight = 10
//! dimension = "functionality"
//! hidden = false
//! network = true       # the check may use the network (default: none at all)
//! memory_mib = 512     # address-space limit of the check (default 512)
//! ```

use std::collections::HashSet;

use serde::Deserialize;
use toml::Spanned;

use crate::limits::{self, Endpoint, HostResources, LabLimits, NetworkPolicy};

/// Desktop runtimes a host knows how to make.
pub const RUNTIMES: &[&str] = &["local-user"];

/// A validated template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub name: String,
    pub runtime: String,
    pub gpus: u32,
    pub gpu_memory_mib: Option<u64>,
    pub skeleton: String,
    pub checks: Vec<Check>,
    /// what the lab may use of its host and reach
    pub limits: LabLimits,
    /// where each limit is written, so a host that cannot meet it is named on its line
    pub lines: FieldLines,
}

/// The 1-based line of each field that hosts are compared against (the template's own
/// line where the field is left to its default).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldLines {
    pub template: usize,
    pub cpu: usize,
    pub memory_mib: usize,
    pub pids: usize,
    pub gpus: usize,
    pub gpu_memory_mib: usize,
    pub io_weight: usize,
    pub disk_mib: usize,
    pub network: usize,
}

impl FieldLines {
    fn of(&self, field: &str) -> usize {
        match field {
            "cpu" => self.cpu,
            "memory_mib" => self.memory_mib,
            "pids" => self.pids,
            "gpus" => self.gpus,
            "gpu_memory_mib" => self.gpu_memory_mib,
            "io_weight" => self.io_weight,
            "disk_mib" => self.disk_mib,
            "network" => self.network,
            _ => self.template,
        }
    }
}

/// Templates no host can run, one error per template on the line of the field at fault.
/// With no hosts known yet nothing is refused (placement says so later).
pub fn unfit_for_hosts(templates: &[Template], hosts: &[HostResources]) -> Vec<TemplateError> {
    templates
        .iter()
        .filter_map(|t| {
            limits::fits_some_host(&t.limits, t.gpus, t.gpu_memory_mib, hosts)
                .err()
                .map(|unfit| TemplateError {
                    line: t.lines.of(unfit.field),
                    message: format!(
                        "template {:?}: no enrolled lab host can run it: {unfit}",
                        t.name
                    ),
                })
        })
        .collect()
}

/// A check run against a team's lab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: String,
    pub script: String,
    pub timeout_secs: u32,
    pub weight: u32,
    pub dimension: String,
    pub hidden: bool,
    /// whether the check may use the network; without it the check runs in an empty
    /// network namespace (not even loopback)
    pub network: bool,
    /// address-space limit of the check's processes
    pub memory_mib: u32,
}

/// Memory a check gets unless its template says otherwise.
pub const DEFAULT_CHECK_MEMORY_MIB: u32 = 512;

/// One problem in a template file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct TemplateError {
    /// 1-based line in the file
    pub line: usize,
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    template: Vec<Spanned<RawTemplate>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTemplate {
    name: Spanned<String>,
    runtime: Spanned<String>,
    #[serde(default = "no_gpus")]
    gpus: Spanned<u32>,
    gpu_memory_mib: Option<Spanned<u64>>,
    skeleton: Spanned<String>,
    cpu: Option<Spanned<f64>>,
    cpu_weight: Option<Spanned<u32>>,
    memory_mib: Option<Spanned<u32>>,
    pids: Option<Spanned<u32>>,
    io_weight: Option<Spanned<u32>>,
    disk_mib: Option<Spanned<u32>>,
    network: Option<Spanned<String>>,
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    #[serde(default)]
    check: Vec<Spanned<RawCheck>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    name: Spanned<String>,
    script: Spanned<String>,
    timeout_secs: Spanned<u32>,
    #[serde(default = "default_weight")]
    weight: Spanned<u32>,
    dimension: Spanned<String>,
    #[serde(default)]
    hidden: bool,
    #[serde(default)]
    network: bool,
    #[serde(default = "default_memory")]
    memory_mib: Spanned<u32>,
}

fn default_memory() -> Spanned<u32> {
    Spanned::new(0..0, DEFAULT_CHECK_MEMORY_MIB)
}

fn no_gpus() -> Spanned<u32> {
    Spanned::new(0..0, 0)
}

fn default_weight() -> Spanned<u32> {
    Spanned::new(0..0, 1)
}

/// The 1-based line of a byte offset in `text`.
pub fn line_at(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// Parses a TOML file into `T`; a syntax, type or unknown-key error comes back with its
/// line. Shared by every organizer-written TOML file (templates, rubrics).
pub fn parse_toml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, (usize, String)> {
    toml::from_str(text).map_err(|e| {
        (
            e.span().map_or(1, |span| line_at(text, span.start)),
            e.message().to_owned(),
        )
    })
}

/// Parses and validates a template file.
pub fn parse(text: &str) -> Result<Vec<Template>, Vec<TemplateError>> {
    let line = |offset: usize| line_at(text, offset);
    let file: File =
        parse_toml(text).map_err(|(line, message)| vec![TemplateError { line, message }])?;
    let mut errors = Vec::new();
    let mut error = |offset: usize, message: String| {
        errors.push(TemplateError {
            line: line(offset),
            message,
        })
    };
    if file.template.is_empty() {
        error(
            0,
            "no templates: add at least one [[template]] table".into(),
        );
    }
    let mut names = HashSet::new();
    let mut templates = Vec::new();
    for raw in &file.template {
        let t = raw.get_ref();
        let name = t.name.get_ref().trim();
        let valid_name = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid_name {
            error(
                t.name.span().start,
                format!("template name {name:?} must be 1–64 characters of a–z, 0–9 and '-'"),
            );
        } else if !names.insert(name.to_owned()) {
            error(
                t.name.span().start,
                format!("template {name:?} is defined twice"),
            );
        }
        if !RUNTIMES.contains(&t.runtime.get_ref().as_str()) {
            error(
                t.runtime.span().start,
                format!(
                    "unknown runtime {:?}; known: {}",
                    t.runtime.get_ref(),
                    RUNTIMES.join(", ")
                ),
            );
        }
        if *t.gpus.get_ref() > 16 {
            error(t.gpus.span().start, "gpus must be at most 16".into());
        }
        if let Some(memory) = t.gpu_memory_mib.as_ref().filter(|_| *t.gpus.get_ref() == 0) {
            error(memory.span().start, "gpu_memory_mib needs gpus >= 1".into());
        }
        let skeleton = t.skeleton.get_ref();
        if !skeleton.starts_with('/') || skeleton.split('/').any(|part| part == "..") {
            error(
                t.skeleton.span().start,
                format!("skeleton {skeleton:?} must be an absolute path without '..'"),
            );
        }
        let template_line = line(raw.span().start);
        let at =
            |span: Option<std::ops::Range<usize>>| span.map_or(template_line, |s| line(s.start));
        let mut limits = LabLimits::default();
        if let Some(cpu) = &t.cpu {
            let cores = *cpu.get_ref();
            if !(0.1..=512.0).contains(&cores) {
                error(
                    cpu.span().start,
                    "cpu must be between 0.1 and 512 cores".into(),
                );
            } else {
                // Rounded to whole thousandths of a core.
                limits.cpu_millicores = format!("{:.0}", cores * 1000.0)
                    .parse()
                    .unwrap_or(limits.cpu_millicores);
            }
        }
        let ranged = |value: &Option<Spanned<u32>>,
                      range: std::ops::RangeInclusive<u32>,
                      what: &str,
                      error: &mut dyn FnMut(usize, String)| {
            value.as_ref().and_then(|v| {
                if range.contains(v.get_ref()) {
                    Some(*v.get_ref())
                } else {
                    error(
                        v.span().start,
                        format!(
                            "{what} must be between {} and {}",
                            range.start(),
                            range.end()
                        ),
                    );
                    None
                }
            })
        };
        if let Some(weight) = ranged(&t.cpu_weight, 1..=10_000, "cpu_weight", &mut error) {
            limits.cpu_weight = weight;
        }
        if let Some(memory) = ranged(&t.memory_mib, 64..=1_048_576, "memory_mib", &mut error) {
            limits.memory_mib = memory;
        }
        if let Some(pids) = ranged(&t.pids, 32..=1_000_000, "pids", &mut error) {
            limits.pids = pids;
        }
        limits.io_weight = ranged(&t.io_weight, 1..=10_000, "io_weight", &mut error);
        limits.disk_mib = ranged(&t.disk_mib, 64..=4_194_304, "disk_mib", &mut error);
        if let Some(network) = &t.network {
            match NetworkPolicy::parse(network.get_ref()) {
                Some(policy) => limits.network = policy,
                None => error(
                    network.span().start,
                    format!(
                        "network must be \"none\", \"venue\" or \"internet\" (got {:?})",
                        network.get_ref()
                    ),
                ),
            }
        }
        if t.allow.len() > 64 {
            error(
                t.allow[64].span().start,
                "allow holds at most 64 entries".into(),
            );
        }
        for entry in &t.allow {
            match Endpoint::parse(entry.get_ref()) {
                Ok(endpoint) if !limits.allow.contains(&endpoint) => limits.allow.push(endpoint),
                Ok(_) => {}
                Err(message) => error(entry.span().start, format!("allow: {message}")),
            }
        }
        let lines = FieldLines {
            template: template_line,
            cpu: at(t.cpu.as_ref().map(Spanned::span)),
            memory_mib: at(t.memory_mib.as_ref().map(Spanned::span)),
            pids: at(t.pids.as_ref().map(Spanned::span)),
            gpus: if t.gpus.span() == (0..0) {
                template_line
            } else {
                line(t.gpus.span().start)
            },
            gpu_memory_mib: at(t.gpu_memory_mib.as_ref().map(Spanned::span)),
            io_weight: at(t.io_weight.as_ref().map(Spanned::span)),
            disk_mib: at(t.disk_mib.as_ref().map(Spanned::span)),
            network: at(t.network.as_ref().map(Spanned::span)),
        };
        let mut check_names = HashSet::new();
        let mut checks = Vec::new();
        for raw_check in &t.check {
            let c = raw_check.get_ref();
            let check_name = c.name.get_ref().trim();
            if check_name.is_empty() {
                error(c.name.span().start, "check name must not be empty".into());
            } else if !check_names.insert(check_name.to_lowercase()) {
                error(
                    c.name.span().start,
                    format!("check {check_name:?} appears twice in template {name:?}"),
                );
            }
            if c.script.get_ref().trim().is_empty() {
                error(
                    c.script.span().start,
                    "check script must not be empty".into(),
                );
            }
            if !(1..=3600).contains(c.timeout_secs.get_ref()) {
                error(
                    c.timeout_secs.span().start,
                    "timeout_secs must be between 1 and 3600".into(),
                );
            }
            if *c.weight.get_ref() > 1000 {
                error(
                    c.weight.span().start.max(raw_check.span().start),
                    "weight must be at most 1000".into(),
                );
            }
            if c.dimension.get_ref().trim().is_empty() {
                error(
                    c.dimension.span().start,
                    "dimension must not be empty".into(),
                );
            }
            if !(16..=65_536).contains(c.memory_mib.get_ref()) {
                error(
                    c.memory_mib.span().start.max(raw_check.span().start),
                    "memory_mib must be between 16 and 65536".into(),
                );
            }
            checks.push(Check {
                name: check_name.to_owned(),
                script: c.script.get_ref().clone(),
                timeout_secs: *c.timeout_secs.get_ref(),
                weight: *c.weight.get_ref(),
                dimension: c.dimension.get_ref().trim().to_owned(),
                hidden: c.hidden,
                network: c.network,
                memory_mib: *c.memory_mib.get_ref(),
            });
        }
        templates.push(Template {
            name: name.to_owned(),
            runtime: t.runtime.get_ref().clone(),
            gpus: *t.gpus.get_ref(),
            gpu_memory_mib: t.gpu_memory_mib.as_ref().map(|m| *m.get_ref()),
            skeleton: skeleton.clone(),
            checks,
            limits,
            lines,
        });
    }
    if errors.is_empty() {
        Ok(templates)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[template]]
name = "gpu-desktop"
runtime = "local-user"
gpus = 1
gpu_memory_mib = 8000
skeleton = "/srv/labrack/skel/gpu"

[[template.check]]
name = "web server answers"
script = "curl -fsS http://localhost:8080/"
timeout_secs = 30
weight = 10
dimension = "functionality"

[[template]]
name = "cpu-only"
runtime = "local-user"
skeleton = "/srv/labrack/skel/cpu"
"#;

    fn lines(text: &str) -> Vec<(usize, String)> {
        parse(text)
            .err()
            .unwrap_or_default()
            .into_iter()
            .map(|e| (e.line, e.message))
            .collect()
    }

    #[test]
    fn a_good_file() {
        let templates = parse(GOOD).expect("valid");
        assert_eq!(templates.len(), 2);
        assert_eq!(templates[0].gpus, 1);
        assert_eq!(templates[0].checks[0].timeout_secs, 30);
        assert!(!templates[0].checks[0].hidden);
        assert!(
            !templates[0].checks[0].network,
            "no network unless the template allows it"
        );
        assert_eq!(templates[0].checks[0].memory_mib, DEFAULT_CHECK_MEMORY_MIB);
        assert_eq!(templates[1].gpus, 0);
        assert!(templates[1].checks.is_empty());
    }

    #[test]
    fn every_semantic_error_names_its_line() {
        let bad = GOOD
            .replace("name = \"cpu-only\"", "name = \"gpu-desktop\"")
            .replace("timeout_secs = 30", "timeout_secs = 0")
            .replace(
                "runtime = \"local-user\"\nskeleton = \"/srv/labrack/skel/cpu\"",
                "runtime = \"vm\"\nskeleton = \"../cpu\"",
            );
        let found = lines(&bad);
        let at: Vec<usize> = found.iter().map(|(l, _)| *l).collect();
        assert_eq!(at, vec![12, 17, 18, 19], "{found:?}");
        assert!(found[0].1.contains("timeout_secs"));
        assert!(found[1].1.contains("defined twice"));
        assert!(found[2].1.contains("unknown runtime"));
        assert!(found[3].1.contains("absolute path"));
    }

    #[test]
    fn check_limits_are_validated_on_their_line() {
        let text = GOOD.replace("weight = 10", "weight = 10\nnetwork = true\nmemory_mib = 4");
        assert_eq!(
            lines(&text),
            vec![(15, "memory_mib must be between 16 and 65536".to_owned())]
        );
        let ok = parse(&GOOD.replace(
            "weight = 10",
            "weight = 10\nnetwork = true\nmemory_mib = 2048",
        ))
        .expect("valid");
        assert!(ok[0].checks[0].network);
        assert_eq!(ok[0].checks[0].memory_mib, 2048);
    }

    #[test]
    fn limits_have_defaults_are_validated_on_their_line_and_meet_hosts() {
        let defaults = parse(GOOD).expect("valid");
        assert_eq!(defaults[1].limits, LabLimits::default());
        let text = GOOD.replace(
            "skeleton = \"/srv/labrack/skel/cpu\"",
            "skeleton = \"/srv/labrack/skel/cpu\"\ncpu = 0.5\nmemory_mib = 2048\npids = 300\ndisk_mib = 10240\nnetwork = \"none\"\nallow = [\"10.0.0.5:5432\", \"db.lan:80\"]",
        );
        let set = parse(&text).expect("valid");
        let cpu = &set[1].limits;
        assert_eq!(
            (cpu.cpu_millicores, cpu.memory_mib, cpu.pids, cpu.disk_mib),
            (500, 2048, 300, Some(10_240))
        );
        assert_eq!(cpu.network, NetworkPolicy::None);
        assert_eq!(
            cpu.allow
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["10.0.0.5:5432", "db.lan:80"]
        );
        assert_eq!(set[1].lines.memory_mib, 21);
        let bad = GOOD.replace(
            "skeleton = \"/srv/labrack/skel/cpu\"",
            "skeleton = \"/srv/labrack/skel/cpu\"\ncpu = 0\nmemory_mib = 1\nnetwork = \"lan\"\nallow = [\"nowhere\"]",
        );
        assert_eq!(
            lines(&bad),
            vec![
                (20, "cpu must be between 0.1 and 512 cores".to_owned()),
                (21, "memory_mib must be between 64 and 1048576".to_owned()),
                (
                    22,
                    "network must be \"none\", \"venue\" or \"internet\" (got \"lan\")".to_owned()
                ),
                (23, "allow: \"nowhere\": write HOST:PORT".to_owned()),
            ]
        );
        let host = HostResources {
            cpus: 2,
            memory_mib: 4_000,
            pids_max: 32_768,
            gpus: 1,
            gpu_units: vec![],
            isolation: "cgroup-v1".into(),
            enforces: vec![
                limits::Enforcement::Cpu,
                limits::Enforcement::Memory,
                limits::Enforcement::Pids,
                limits::Enforcement::Network,
                limits::Enforcement::Devices,
            ],
        };
        let big = parse(&GOOD.replace(
            "gpu_memory_mib = 8000",
            "gpu_memory_mib = 8000\nmemory_mib = 65536",
        ))
        .expect("valid");
        let unfit = unfit_for_hosts(&big, std::slice::from_ref(&host));
        assert_eq!(unfit.len(), 2, "{unfit:?}");
        assert_eq!(unfit[0].line, 7, "on the memory_mib line: {unfit:?}");
        assert!(
            unfit[0]
                .message
                .contains("memory_mib: asks for 65536 MiB; the largest host has 4000 MiB")
                && unfit[0].message.contains("\"gpu-desktop\""),
            "{unfit:?}"
        );
        assert_eq!(
            unfit[1].line, 17,
            "a default that no host meets is named at its template: {unfit:?}"
        );
        assert!(
            unfit[1].message.contains("memory_mib: asks for 4096 MiB"),
            "{unfit:?}"
        );
        assert!(
            unfit_for_hosts(&big, &[]).is_empty(),
            "no hosts: nothing to compare yet"
        );
        let small_gpu = HostResources {
            memory_mib: 1 << 20,
            cpus: 8,
            gpu_units: vec![limits::GpuUnit {
                memory_mib: 4_000,
                mig: true,
            }],
            ..host
        };
        let unfit = unfit_for_hosts(&parse(GOOD).expect("valid"), &[small_gpu]);
        assert_eq!(unfit.len(), 1, "{unfit:?}");
        assert_eq!(unfit[0].line, 6, "on the gpu_memory_mib line: {unfit:?}");
        assert!(
            unfit[0]
                .message
                .contains("gpu_memory_mib: asks for 8000 MiB")
                && unfit[0].message.contains("4000 MiB"),
            "{unfit:?}"
        );
    }

    #[test]
    fn syntax_type_and_unknown_key_errors_name_their_line() {
        assert_eq!(lines("[[template]]\nname = \"a\"\nruntime = = 1\n")[0].0, 3);
        let wrong_type = lines(
            "[[template]]\nname = \"a\"\nruntime = \"local-user\"\ngpus = \"two\"\nskeleton = \"/s\"\n",
        );
        assert_eq!(wrong_type[0].0, 4, "{wrong_type:?}");
        let unknown = lines(
            "[[template]]\nname = \"a\"\nruntime = \"local-user\"\nskeleton = \"/s\"\ncolour = \"red\"\n",
        );
        assert!(unknown[0].1.contains("colour"), "{unknown:?}");
        assert_eq!(lines("")[0].0, 1);
    }
}
