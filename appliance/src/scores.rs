//! Scores and the leaderboard (issue 5, item 3).
//!
//! A team's score per rubric dimension is its automatic points (per check of its lab, the
//! check's weight when the latest run with a result passed) plus the judges' points (the
//! mean over judges of each judge's latest score in that dimension). Ranking: total (high
//! first), then who reached that total first, then the team's name; teams equal on both
//! total and time share a rank. A board can be built as of a moment (the freeze), from
//! the results and scores that existed then, and for a bracket (a sub-board).

use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension as _};
use serde::Serialize;
use utoipa::ToSchema;

use crate::rubric::Rubric;

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct BoardRow {
    pub rank: u32,
    pub team_id: i64,
    pub team: String,
    pub total: f64,
    /// from checks
    pub check_points: f64,
    /// from judges (mean per dimension over the judges who scored it)
    pub judge_points: f64,
    /// from the score ledger: hint costs (negative) and staff corrections
    pub adjustments: f64,
    /// points per rubric dimension
    pub dimensions: BTreeMap<String, f64>,
    /// checks whose latest result passed, of those with a result
    pub checks_passed: u32,
    pub checks_scored: u32,
    /// when the team reached its current total (Unix ms); none with no points
    pub reached_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Leaderboard {
    pub event_id: i64,
    /// the rubric's dimensions, in display order, then any other dimension checks use
    pub dimensions: Vec<String>,
    pub bracket: Option<String>,
    /// the board as of this moment (Unix ms): the freeze; none when live
    pub as_of_ms: Option<i64>,
    pub rows: Vec<BoardRow>,
}

/// The latest result of one check for one team.
#[derive(Debug, Clone)]
pub struct LatestResult {
    pub team_id: i64,
    pub dimension: String,
    pub weight: u32,
    pub passed: bool,
    pub finished_ms: i64,
}

/// Judges' points for a team in a dimension.
#[derive(Debug, Clone)]
pub struct JudgedPoints {
    pub team_id: i64,
    pub dimension: String,
    /// mean over judges
    pub points: f64,
    /// the latest score's time
    pub at_ms: i64,
}

fn reached(row: &mut BoardRow, at: i64) {
    row.reached_ms = Some(row.reached_ms.map_or(at, |previous| previous.max(at)));
}

/// Builds the ranked rows from the teams, their latest check results and judges' points.
pub fn rank(
    teams: &[(i64, String)],
    results: &[LatestResult],
    judged: &[JudgedPoints],
    adjustments: &[(i64, f64)],
) -> Vec<BoardRow> {
    let mut rows: Vec<BoardRow> = teams
        .iter()
        .map(|(id, name)| BoardRow {
            rank: 0,
            team_id: *id,
            team: name.clone(),
            total: 0.0,
            check_points: 0.0,
            judge_points: 0.0,
            adjustments: 0.0,
            dimensions: BTreeMap::new(),
            checks_passed: 0,
            checks_scored: 0,
            reached_ms: None,
        })
        .collect();
    let index: BTreeMap<i64, usize> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| (r.team_id, i))
        .collect();
    for result in results {
        let Some(row) = index.get(&result.team_id).and_then(|i| rows.get_mut(*i)) else {
            continue;
        };
        row.checks_scored += 1;
        if result.passed {
            row.checks_passed += 1;
            let points = f64::from(result.weight);
            row.check_points += points;
            *row.dimensions.entry(result.dimension.clone()).or_default() += points;
            if result.weight > 0 {
                reached(row, result.finished_ms);
            }
        }
    }
    for judged in judged {
        let Some(row) = index.get(&judged.team_id).and_then(|i| rows.get_mut(*i)) else {
            continue;
        };
        row.judge_points += judged.points;
        *row.dimensions.entry(judged.dimension.clone()).or_default() += judged.points;
        if judged.points > 0.0 {
            reached(row, judged.at_ms);
        }
    }
    for (team_id, points) in adjustments {
        if let Some(row) = index.get(team_id).and_then(|i| rows.get_mut(*i)) {
            row.adjustments += points;
        }
    }
    for row in &mut rows {
        // Two decimals are plenty for a board and keep equal sums equal.
        row.judge_points = (row.judge_points * 100.0).round() / 100.0;
        row.adjustments = (row.adjustments * 100.0).round() / 100.0;
        row.total =
            ((row.check_points + row.judge_points + row.adjustments) * 100.0).round() / 100.0;
        for points in row.dimensions.values_mut() {
            *points = (*points * 100.0).round() / 100.0;
        }
    }
    rows.sort_by(|a, b| {
        b.total
            .total_cmp(&a.total)
            .then_with(|| {
                a.reached_ms
                    .unwrap_or(i64::MAX)
                    .cmp(&b.reached_ms.unwrap_or(i64::MAX))
            })
            .then_with(|| a.team.to_lowercase().cmp(&b.team.to_lowercase()))
    });
    let mut previous: Option<(f64, Option<i64>, u32)> = None;
    for (position, row) in rows.iter_mut().enumerate() {
        let position = u32::try_from(position + 1).unwrap_or(u32::MAX);
        row.rank = match previous {
            Some((total, reached, rank)) if total == row.total && reached == row.reached_ms => rank,
            _ => position,
        };
        previous = Some((row.total, row.reached_ms, row.rank));
    }
    rows
}

/// The latest result of each (team, check) of an event, optionally as of `until_ms`.
pub fn latest_results(
    conn: &Connection,
    event_id: i64,
    until_ms: Option<i64>,
) -> Result<Vec<LatestResult>, rusqlite::Error> {
    let mut statement = conn.prepare_cached(
        "SELECT r.team_id, r.dimension, r.weight, r.state = 'passed', r.finished_ms FROM check_runs r
         JOIN (SELECT max(id) AS id FROM check_runs
               WHERE event_id = ?1 AND state IN ('passed', 'failed') AND (?2 IS NULL OR finished_ms <= ?2)
               GROUP BY team_id, check_name COLLATE NOCASE) latest ON latest.id = r.id",
    )?;
    let rows = statement.query_map(rusqlite::params![event_id, until_ms], |r| {
        Ok(LatestResult {
            team_id: r.get(0)?,
            dimension: r.get(1)?,
            weight: r.get(2)?,
            passed: r.get(3)?,
            finished_ms: r.get(4)?,
        })
    })?;
    rows.collect()
}

/// Judges' points per (team, dimension): each judge's latest score, averaged over judges.
pub fn judged_points(
    conn: &Connection,
    event_id: i64,
    until_ms: Option<i64>,
) -> Result<Vec<JudgedPoints>, rusqlite::Error> {
    let mut statement = conn.prepare_cached(
        "SELECT s.team_id, s.dimension, avg(s.points), max(s.created_ms) FROM judge_scores s
         JOIN (SELECT max(id) AS id FROM judge_scores WHERE event_id = ?1 AND (?2 IS NULL OR created_ms <= ?2)
               GROUP BY team_id, judge_id, dimension) latest ON latest.id = s.id
         GROUP BY s.team_id, s.dimension",
    )?;
    let rows = statement.query_map(rusqlite::params![event_id, until_ms], |r| {
        Ok(JudgedPoints {
            team_id: r.get(0)?,
            dimension: r.get(1)?,
            points: r.get(2)?,
            at_ms: r.get(3)?,
        })
    })?;
    rows.collect()
}

/// The score ledger's sum per team (hint costs, corrections), optionally as of `until_ms`.
pub fn adjustments(
    conn: &Connection,
    event_id: i64,
    until_ms: Option<i64>,
) -> Result<Vec<(i64, f64)>, rusqlite::Error> {
    let mut statement = conn.prepare_cached(
        "SELECT team_id, sum(points) FROM score_adjustments WHERE event_id = ?1 AND (?2 IS NULL OR created_ms <= ?2) GROUP BY team_id",
    )?;
    let rows = statement.query_map(rusqlite::params![event_id, until_ms], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })?;
    rows.collect()
}

/// The event's rubric, or the default one.
pub fn rubric(conn: &Connection, event_id: i64) -> Result<Rubric, rusqlite::Error> {
    let stored: Option<String> = conn
        .query_row(
            "SELECT rubric FROM rubrics WHERE event_id = ?1",
            [event_id],
            |r| r.get(0),
        )
        .optional()?;
    Ok(stored
        .and_then(|json| serde_json::from_str(&json).ok())
        .unwrap_or_default())
}

/// Why a board cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum BoardError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("no bracket named {0:?} in this event's rubric")]
    UnknownBracket(String),
}

/// The event's board as of `as_of_ms` (live when none), for one bracket or all teams.
pub fn leaderboard(
    conn: &Connection,
    event_id: i64,
    as_of_ms: Option<i64>,
    bracket: Option<&str>,
) -> Result<Leaderboard, BoardError> {
    let rubric = rubric(conn, event_id)?;
    let mut teams: Vec<(i64, String)> = conn
        .prepare_cached("SELECT id, name FROM teams WHERE event_id = ?1")?
        .query_map([event_id], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    if let Some(name) = bracket {
        let chosen = rubric
            .brackets
            .iter()
            .find(|b| b.name == name)
            .ok_or_else(|| BoardError::UnknownBracket(name.to_owned()))?;
        let members: Vec<String> = chosen.teams.iter().map(|t| t.to_lowercase()).collect();
        teams.retain(|(_, team)| members.contains(&team.to_lowercase()));
    }
    let results = latest_results(conn, event_id, as_of_ms)?;
    let judged = judged_points(conn, event_id, as_of_ms)?;
    let mut dimensions: Vec<String> = rubric.dimensions.iter().map(|d| d.name.clone()).collect();
    for dimension in results
        .iter()
        .map(|r| &r.dimension)
        .chain(judged.iter().map(|j| &j.dimension))
    {
        if !dimensions.contains(dimension) {
            dimensions.push(dimension.clone());
        }
    }
    let adjusted = adjustments(conn, event_id, as_of_ms)?;
    Ok(Leaderboard {
        event_id,
        dimensions,
        bracket: bracket.map(str::to_owned),
        as_of_ms,
        rows: rank(&teams, &results, &judged, &adjusted),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(
        team_id: i64,
        dimension: &str,
        weight: u32,
        passed: bool,
        finished_ms: i64,
    ) -> LatestResult {
        LatestResult {
            team_id,
            dimension: dimension.into(),
            weight,
            passed,
            finished_ms,
        }
    }

    #[test]
    fn totals_dimensions_and_tie_breaks() {
        let teams = vec![
            (1, "Red".to_owned()),
            (2, "blue".to_owned()),
            (3, "Green".to_owned()),
            (4, "Amber".to_owned()),
            (5, "Zinc".to_owned()),
        ];
        let results = vec![
            result(1, "functionality", 10, true, 500),
            result(1, "security", 5, false, 400),
            result(2, "functionality", 10, true, 300), // same total as Red, reached earlier
            result(3, "functionality", 4, true, 100),
            result(3, "quality", 6, true, 500), // 10 points at 500: same as Red on both keys
            result(4, "functionality", 0, true, 50), // a passed check worth nothing
            result(99, "functionality", 10, true, 1), // another event's team: ignored
        ];
        let rows = rank(&teams, &results, &[], &[]);
        let order: Vec<(&str, u32, f64)> = rows
            .iter()
            .map(|r| (r.team.as_str(), r.rank, r.total))
            .collect();
        assert_eq!(
            order,
            vec![
                ("blue", 1, 10.0),
                ("Green", 2, 10.0),
                ("Red", 2, 10.0),
                ("Amber", 4, 0.0),
                ("Zinc", 4, 0.0)
            ]
        );
        let red = rows.iter().find(|r| r.team == "Red").expect("red");
        assert_eq!((red.checks_passed, red.checks_scored), (1, 2));
        assert_eq!(red.dimensions.get("functionality"), Some(&10.0));
        assert_eq!(red.dimensions.get("security"), None);
        let green = rows.iter().find(|r| r.team == "Green").expect("green");
        assert_eq!(green.dimensions.get("quality"), Some(&6.0));
        assert_eq!(
            rows.iter()
                .find(|r| r.team == "Amber")
                .expect("amber")
                .reached_ms,
            None,
            "zero points reach nothing"
        );
    }

    #[test]
    fn judges_points_add_to_checks_and_can_overtake() {
        let teams = vec![(1, "Red".to_owned()), (2, "Blue".to_owned())];
        let results = vec![
            result(1, "functionality", 10, true, 100),
            result(2, "functionality", 10, true, 200),
        ];
        let judged = vec![JudgedPoints {
            team_id: 2,
            dimension: "presentation".into(),
            points: 7.0 / 3.0,
            at_ms: 300,
        }];
        let rows = rank(&teams, &results, &judged, &[(1, -0.5)]);
        assert_eq!(
            (rows[0].team.as_str(), rows[0].total, rows[0].judge_points),
            ("Blue", 12.33, 2.33)
        );
        assert_eq!(
            rows[0].reached_ms,
            Some(300),
            "the judges' score is when Blue reached its total"
        );
        assert_eq!(rows[0].dimensions.get("presentation"), Some(&2.33));
        assert_eq!(
            (
                rows[1].team.as_str(),
                rows[1].rank,
                rows[1].total,
                rows[1].adjustments
            ),
            ("Red", 2, 9.5, -0.5),
            "a hint's cost comes off"
        );
    }
}
