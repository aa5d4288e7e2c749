//! The leaderboard's ranking, one function for the appliance's board and the cloud's
//! rebuilt one. A team's score per rubric dimension is its automatic points (per check, the
//! check's weight when the latest run with a result passed) plus the judges' points (the
//! mean over judges of each judge's latest score in that dimension) plus adjustments (hint
//! costs, corrections). Ranking: total (high first), then who reached that total first,
//! then the team's name; teams equal on both total and time share a rank.

use std::collections::BTreeMap;

use serde::Serialize;
use utoipa::ToSchema;

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
