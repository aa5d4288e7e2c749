//! Scores from checks and the leaderboard (issue 5, item 3, first part).
//!
//! A team's automatic score is, per check of its lab, the check's weight when the latest
//! run of that check that produced a result passed. Ranking: total points (high first),
//! then who reached that total first, then the team's name. Teams equal on both points
//! and time share a rank.

use std::collections::BTreeMap;

use rusqlite::Connection;
use serde::Serialize;
use utoipa::ToSchema;

use crate::checks::DEFAULT_DIMENSIONS;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct BoardRow {
    pub rank: u32,
    pub team_id: i64,
    pub team: String,
    pub total: u64,
    /// points per rubric dimension
    pub dimensions: BTreeMap<String, u64>,
    /// checks whose latest result passed, of those with a result
    pub checks_passed: u32,
    pub checks_scored: u32,
    /// when the team reached its current total (Unix ms); none with no points
    pub reached_ms: Option<i64>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Leaderboard {
    pub event_id: i64,
    /// the rubric's dimensions, in display order
    pub dimensions: Vec<String>,
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

/// Builds the ranked rows from every team and the latest result of each of its checks.
pub fn rank(teams: &[(i64, String)], results: &[LatestResult]) -> Vec<BoardRow> {
    let mut rows: Vec<BoardRow> = teams
        .iter()
        .map(|(id, name)| BoardRow {
            rank: 0,
            team_id: *id,
            team: name.clone(),
            total: 0,
            dimensions: BTreeMap::new(),
            checks_passed: 0,
            checks_scored: 0,
            reached_ms: None,
        })
        .collect();
    let index: BTreeMap<i64, usize> = rows.iter().enumerate().map(|(i, r)| (r.team_id, i)).collect();
    for result in results {
        let Some(row) = index.get(&result.team_id).and_then(|i| rows.get_mut(*i)) else { continue };
        row.checks_scored += 1;
        if result.passed {
            row.checks_passed += 1;
            row.total += u64::from(result.weight);
            *row.dimensions.entry(result.dimension.clone()).or_default() += u64::from(result.weight);
            if result.weight > 0 {
                row.reached_ms = Some(row.reached_ms.map_or(result.finished_ms, |at| at.max(result.finished_ms)));
            }
        }
    }
    rows.sort_by(|a, b| {
        b.total
            .cmp(&a.total)
            .then_with(|| a.reached_ms.unwrap_or(i64::MAX).cmp(&b.reached_ms.unwrap_or(i64::MAX)))
            .then_with(|| a.team.to_lowercase().cmp(&b.team.to_lowercase()))
    });
    let mut previous: Option<(u64, Option<i64>, u32)> = None;
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

/// The latest result of each (team, check) of an event, optionally only before `until_ms`.
pub fn latest_results(conn: &Connection, event_id: i64, until_ms: Option<i64>) -> Result<Vec<LatestResult>, rusqlite::Error> {
    let mut statement = conn.prepare_cached(
        "SELECT r.team_id, r.dimension, r.weight, r.state = 'passed', r.finished_ms FROM check_runs r
         JOIN (SELECT max(id) AS id FROM check_runs
               WHERE event_id = ?1 AND state IN ('passed', 'failed') AND (?2 IS NULL OR finished_ms <= ?2)
               GROUP BY team_id, check_name COLLATE NOCASE) latest ON latest.id = r.id",
    )?;
    let rows = statement.query_map(rusqlite::params![event_id, until_ms], |r| {
        Ok(LatestResult { team_id: r.get(0)?, dimension: r.get(1)?, weight: r.get(2)?, passed: r.get(3)?, finished_ms: r.get(4)? })
    })?;
    rows.collect()
}

/// The event's live leaderboard.
pub fn leaderboard(conn: &Connection, event_id: i64) -> Result<Leaderboard, rusqlite::Error> {
    let teams: Vec<(i64, String)> = conn
        .prepare_cached("SELECT id, name FROM teams WHERE event_id = ?1")?
        .query_map([event_id], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let results = latest_results(conn, event_id, None)?;
    let mut dimensions: Vec<String> = DEFAULT_DIMENSIONS.iter().map(|d| (*d).to_owned()).collect();
    for result in &results {
        if !dimensions.contains(&result.dimension) {
            dimensions.push(result.dimension.clone());
        }
    }
    Ok(Leaderboard { event_id, dimensions, rows: rank(&teams, &results) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(team_id: i64, dimension: &str, weight: u32, passed: bool, finished_ms: i64) -> LatestResult {
        LatestResult { team_id, dimension: dimension.into(), weight, passed, finished_ms }
    }

    #[test]
    fn totals_dimensions_and_tie_breaks() {
        let teams = vec![(1, "Red".to_owned()), (2, "blue".to_owned()), (3, "Green".to_owned()), (4, "Amber".to_owned()), (5, "Zinc".to_owned())];
        let results = vec![
            result(1, "functionality", 10, true, 500),
            result(1, "security", 5, false, 400),
            result(2, "functionality", 10, true, 300), // same total as Red, reached earlier
            result(3, "functionality", 4, true, 100),
            result(3, "quality", 6, true, 500), // 10 points at 500: same as Red on both keys
            result(4, "functionality", 0, true, 50), // a passed check worth nothing
            result(99, "functionality", 10, true, 1), // another event's team: ignored
        ];
        let rows = rank(&teams, &results);
        let order: Vec<(&str, u32, u64)> = rows.iter().map(|r| (r.team.as_str(), r.rank, r.total)).collect();
        assert_eq!(order, vec![("blue", 1, 10), ("Green", 2, 10), ("Red", 2, 10), ("Amber", 4, 0), ("Zinc", 4, 0)]);
        let red = rows.iter().find(|r| r.team == "Red").expect("red");
        assert_eq!((red.checks_passed, red.checks_scored), (1, 2));
        assert_eq!(red.dimensions.get("functionality"), Some(&10));
        assert_eq!(red.dimensions.get("security"), None);
        let green = rows.iter().find(|r| r.team == "Green").expect("green");
        assert_eq!(green.dimensions.get("quality"), Some(&6));
        assert_eq!(rows.iter().find(|r| r.team == "Amber").expect("amber").reached_ms, None, "zero points reach nothing");
    }
}
