//! An event's rubric: the dimensions scores are kept in (with how many points a judge may
//! give in each) and the brackets (sub-boards). Organizers write it in TOML; every error
//! names its line, and a file with any error changes nothing. No I/O.
//!
//! ```toml
//! [[dimension]]
//! name = "functionality"
//! label = "Does it work?"   # shown on boards; default: the name
//! judge_max = 10            # most points one judge gives here; 0 = checks only
//!
//! [[bracket]]
//! name = "students"
//! teams = ["Red", "Blue"]
//! ```

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use toml::Spanned;

/// Dimensions every rubric starts with.
pub const DEFAULT_DIMENSIONS: [&str; 5] = [
    "functionality",
    "quality",
    "performance",
    "security",
    "presentation",
];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Dimension {
    pub name: String,
    pub label: String,
    pub judge_max: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Bracket {
    pub name: String,
    pub teams: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Rubric {
    pub dimensions: Vec<Dimension>,
    pub brackets: Vec<Bracket>,
}

impl Default for Rubric {
    /// Five dimensions, 10 judge points each, no brackets.
    fn default() -> Self {
        Self {
            dimensions: DEFAULT_DIMENSIONS
                .iter()
                .map(|name| Dimension {
                    name: (*name).to_owned(),
                    label: (*name).to_owned(),
                    judge_max: 10,
                })
                .collect(),
            brackets: Vec::new(),
        }
    }
}

impl Rubric {
    pub fn dimension(&self, name: &str) -> Option<&Dimension> {
        self.dimensions.iter().find(|d| d.name == name)
    }
}

/// One problem in a rubric file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct RubricError {
    pub line: usize,
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    dimension: Vec<Spanned<RawDimension>>,
    #[serde(default)]
    bracket: Vec<Spanned<RawBracket>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDimension {
    name: Spanned<String>,
    label: Option<String>,
    #[serde(default)]
    judge_max: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBracket {
    name: Spanned<String>,
    teams: Vec<Spanned<String>>,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Parses and validates a rubric; `team_exists` says whether a bracket's team name is a
/// team of the event.
pub fn parse(text: &str, team_exists: impl Fn(&str) -> bool) -> Result<Rubric, Vec<RubricError>> {
    use labrack_provisioner::template::{line_at, parse_toml};
    let line = |offset: usize| line_at(text, offset);
    let file: File =
        parse_toml(text).map_err(|(line, message)| vec![RubricError { line, message }])?;
    let mut errors = Vec::new();
    let mut error = |offset: usize, message: String| {
        errors.push(RubricError {
            line: line(offset),
            message,
        })
    };
    if file.dimension.is_empty() {
        error(
            0,
            "no dimensions: add at least one [[dimension]] table".into(),
        );
    }
    if file.dimension.len() > 20 {
        error(
            file.dimension[20].span().start,
            "at most 20 dimensions".into(),
        );
    }
    let mut names = HashSet::new();
    let mut dimensions = Vec::new();
    for raw in &file.dimension {
        let d = raw.get_ref();
        let name = d.name.get_ref().trim();
        if !valid_name(name) {
            error(
                d.name.span().start,
                format!("dimension name {name:?} must be 1–64 characters of a–z, 0–9, '-' and '_'"),
            );
        } else if !names.insert(name.to_owned()) {
            error(
                d.name.span().start,
                format!("dimension {name:?} is defined twice"),
            );
        }
        let label = d.label.clone().unwrap_or_else(|| name.to_owned());
        if label.trim().is_empty() || label.chars().count() > 80 {
            error(raw.span().start, "label must be 1–80 characters".into());
        }
        let judge_max = d.judge_max.as_ref().map_or(10, |m| *m.get_ref());
        if let Some(max) = &d.judge_max
            && *max.get_ref() > 1000
        {
            error(max.span().start, "judge_max must be at most 1000".into());
        }
        dimensions.push(Dimension {
            name: name.to_owned(),
            label: label.trim().to_owned(),
            judge_max,
        });
    }
    let mut bracket_names = HashSet::new();
    let mut brackets = Vec::new();
    for raw in &file.bracket {
        let b = raw.get_ref();
        let name = b.name.get_ref().trim();
        if !valid_name(name) {
            error(
                b.name.span().start,
                format!("bracket name {name:?} must be 1–64 characters of a–z, 0–9, '-' and '_'"),
            );
        } else if !bracket_names.insert(name.to_owned()) {
            error(
                b.name.span().start,
                format!("bracket {name:?} is defined twice"),
            );
        }
        if b.teams.is_empty() {
            error(raw.span().start, format!("bracket {name:?} has no teams"));
        }
        let mut seen = HashSet::new();
        for team in &b.teams {
            let team_name = team.get_ref().trim();
            if !team_exists(team_name) {
                error(
                    team.span().start,
                    format!("bracket {name:?}: no team named {team_name:?} in this event"),
                );
            } else if !seen.insert(team_name.to_lowercase()) {
                error(
                    team.span().start,
                    format!("bracket {name:?} lists {team_name:?} twice"),
                );
            }
        }
        brackets.push(Bracket {
            name: name.to_owned(),
            teams: b
                .teams
                .iter()
                .map(|t| t.get_ref().trim().to_owned())
                .collect(),
        });
    }
    if errors.is_empty() {
        Ok(Rubric {
            dimensions,
            brackets,
        })
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[dimension]]
name = "functionality"
judge_max = 20

[[dimension]]
name = "presentation"
label = "Pitch"

[[bracket]]
name = "students"
teams = ["Red", "blue"]
"#;

    fn teams(name: &str) -> bool {
        ["red", "blue", "green"].contains(&name.to_lowercase().as_str())
    }

    fn errors(text: &str) -> Vec<(usize, String)> {
        parse(text, teams)
            .err()
            .unwrap_or_default()
            .into_iter()
            .map(|e| (e.line, e.message))
            .collect()
    }

    #[test]
    fn a_good_rubric() {
        let rubric = parse(GOOD, teams).expect("valid");
        assert_eq!(
            rubric.dimensions[0],
            Dimension {
                name: "functionality".into(),
                label: "functionality".into(),
                judge_max: 20
            }
        );
        assert_eq!(rubric.dimensions[1].label, "Pitch");
        assert_eq!(
            rubric.dimensions[1].judge_max, 10,
            "judges give up to 10 by default"
        );
        assert_eq!(rubric.brackets[0].teams, ["Red", "blue"]);
        assert_eq!(Rubric::default().dimensions.len(), 5);
    }

    #[test]
    fn every_error_names_its_line() {
        let bad = GOOD
            .replace("name = \"presentation\"", "name = \"functionality\"")
            .replace("judge_max = 20", "judge_max = 5000")
            .replace("[\"Red\", \"blue\"]", "[\"Red\", \"Purple\", \"red\"]");
        let found = errors(&bad);
        let lines: Vec<usize> = found.iter().map(|(l, _)| *l).collect();
        assert_eq!(lines, vec![4, 7, 12, 12], "{found:?}");
        assert!(found[0].1.contains("judge_max"));
        assert!(found[1].1.contains("defined twice"));
        assert!(found[2].1.contains("Purple"));
        assert!(found[3].1.contains("twice"));
    }

    #[test]
    fn syntax_types_unknown_keys_and_empty_files() {
        assert_eq!(errors("[[dimension]]\nname = = 1\n")[0].0, 2);
        assert_eq!(
            errors("[[dimension]]\nname = \"a\"\njudge_max = \"ten\"\n")[0].0,
            3
        );
        assert!(
            errors("[[dimension]]\nname = \"a\"\ncolour = 1\n")[0]
                .1
                .contains("colour")
        );
        assert_eq!(
            errors(""),
            vec![(
                1,
                "no dimensions: add at least one [[dimension]] table".to_owned()
            )]
        );
        assert_eq!(errors("[[dimension]]\nname = \"Bad Name\"\n")[0].0, 2);
    }
}
