//! Lab templates: what a lab is made of (desktop runtime, GPU need, home skeleton, checks).
//! Organizers write them in TOML; every error names its line, and a file with any error
//! yields no templates.
//!
//! ```toml
//! [[template]]
//! name = "gpu-desktop"
//! runtime = "local-user"
//! gpus = 1
//! skeleton = "/srv/labrack/skel/gpu-desktop"
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
    text.as_bytes()[..offset.min(text.len())].iter().filter(|b| **b == b'\n').count() + 1
}

/// Parses a TOML file into `T`; a syntax, type or unknown-key error comes back with its
/// line. Shared by every organizer-written TOML file (templates, rubrics).
pub fn parse_toml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, (usize, String)> {
    toml::from_str(text).map_err(|e| (e.span().map_or(1, |span| line_at(text, span.start)), e.message().to_owned()))
}

/// Parses and validates a template file.
pub fn parse(text: &str) -> Result<Vec<Template>, Vec<TemplateError>> {
    let line = |offset: usize| line_at(text, offset);
    let file: File = parse_toml(text).map_err(|(line, message)| vec![TemplateError { line, message }])?;
    let mut errors = Vec::new();
    let mut error = |offset: usize, message: String| errors.push(TemplateError { line: line(offset), message });
    if file.template.is_empty() {
        error(0, "no templates: add at least one [[template]] table".into());
    }
    let mut names = HashSet::new();
    let mut templates = Vec::new();
    for raw in &file.template {
        let t = raw.get_ref();
        let name = t.name.get_ref().trim();
        let valid_name = !name.is_empty()
            && name.len() <= 64
            && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid_name {
            error(t.name.span().start, format!("template name {name:?} must be 1–64 characters of a–z, 0–9 and '-'"));
        } else if !names.insert(name.to_owned()) {
            error(t.name.span().start, format!("template {name:?} is defined twice"));
        }
        if !RUNTIMES.contains(&t.runtime.get_ref().as_str()) {
            error(t.runtime.span().start, format!("unknown runtime {:?}; known: {}", t.runtime.get_ref(), RUNTIMES.join(", ")));
        }
        if *t.gpus.get_ref() > 16 {
            error(t.gpus.span().start, "gpus must be at most 16".into());
        }
        if let Some(memory) = t.gpu_memory_mib.as_ref().filter(|_| *t.gpus.get_ref() == 0) {
            error(memory.span().start, "gpu_memory_mib needs gpus >= 1".into());
        }
        let skeleton = t.skeleton.get_ref();
        if !skeleton.starts_with('/') || skeleton.split('/').any(|part| part == "..") {
            error(t.skeleton.span().start, format!("skeleton {skeleton:?} must be an absolute path without '..'"));
        }
        let mut check_names = HashSet::new();
        let mut checks = Vec::new();
        for raw_check in &t.check {
            let c = raw_check.get_ref();
            let check_name = c.name.get_ref().trim();
            if check_name.is_empty() {
                error(c.name.span().start, "check name must not be empty".into());
            } else if !check_names.insert(check_name.to_lowercase()) {
                error(c.name.span().start, format!("check {check_name:?} appears twice in template {name:?}"));
            }
            if c.script.get_ref().trim().is_empty() {
                error(c.script.span().start, "check script must not be empty".into());
            }
            if !(1..=3600).contains(c.timeout_secs.get_ref()) {
                error(c.timeout_secs.span().start, "timeout_secs must be between 1 and 3600".into());
            }
            if *c.weight.get_ref() > 1000 {
                error(c.weight.span().start.max(raw_check.span().start), "weight must be at most 1000".into());
            }
            if c.dimension.get_ref().trim().is_empty() {
                error(c.dimension.span().start, "dimension must not be empty".into());
            }
            if !(16..=65_536).contains(c.memory_mib.get_ref()) {
                error(c.memory_mib.span().start.max(raw_check.span().start), "memory_mib must be between 16 and 65536".into());
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
        });
    }
    if errors.is_empty() { Ok(templates) } else { Err(errors) }
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
        parse(text).err().unwrap_or_default().into_iter().map(|e| (e.line, e.message)).collect()
    }

    #[test]
    fn a_good_file() {
        let templates = parse(GOOD).expect("valid");
        assert_eq!(templates.len(), 2);
        assert_eq!(templates[0].gpus, 1);
        assert_eq!(templates[0].checks[0].timeout_secs, 30);
        assert!(!templates[0].checks[0].hidden);
        assert!(!templates[0].checks[0].network, "no network unless the template allows it");
        assert_eq!(templates[0].checks[0].memory_mib, DEFAULT_CHECK_MEMORY_MIB);
        assert_eq!(templates[1].gpus, 0);
        assert!(templates[1].checks.is_empty());
    }

    #[test]
    fn every_semantic_error_names_its_line() {
        let bad = GOOD
            .replace("name = \"cpu-only\"", "name = \"gpu-desktop\"")
            .replace("timeout_secs = 30", "timeout_secs = 0")
            .replace("runtime = \"local-user\"\nskeleton = \"/srv/labrack/skel/cpu\"", "runtime = \"vm\"\nskeleton = \"../cpu\"");
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
        assert_eq!(lines(&text), vec![(15, "memory_mib must be between 16 and 65536".to_owned())]);
        let ok = parse(&GOOD.replace("weight = 10", "weight = 10\nnetwork = true\nmemory_mib = 2048")).expect("valid");
        assert!(ok[0].checks[0].network);
        assert_eq!(ok[0].checks[0].memory_mib, 2048);
    }

    #[test]
    fn syntax_type_and_unknown_key_errors_name_their_line() {
        assert_eq!(lines("[[template]]\nname = \"a\"\nruntime = = 1\n")[0].0, 3);
        let wrong_type = lines("[[template]]\nname = \"a\"\nruntime = \"local-user\"\ngpus = \"two\"\nskeleton = \"/s\"\n");
        assert_eq!(wrong_type[0].0, 4, "{wrong_type:?}");
        let unknown = lines("[[template]]\nname = \"a\"\nruntime = \"local-user\"\nskeleton = \"/s\"\ncolour = \"red\"\n");
        assert!(unknown[0].1.contains("colour"), "{unknown:?}");
        assert_eq!(lines("")[0].0, 1);
    }
}
