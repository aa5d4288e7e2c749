//! Scores and the leaderboard.
//!
//! The ranking itself is `labrack_provisioner::ranking` (the cloud uses the same); here the
//! board's inputs are read from the database. A board can be built as of a moment (the
//! freeze), from the results and scores that existed then, and for a bracket (a sub-board).

use rusqlite::{Connection, OptionalExtension as _, params};
use serde::Serialize;
use utoipa::ToSchema;

pub use labrack_provisioner::ranking::{BoardRow, JudgedPoints, LatestResult, rank};

use crate::error::Error;
use crate::rubric::Rubric;

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

/// What scoring a submission came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scoring {
    /// its checks are queued as this batch
    Queued(i64),
    /// the team's previous submission is still being checked: try again later (a team has
    /// one outstanding scoring batch)
    Wait,
    /// a newer submission of the team replaces it before it was checked; that one is scored
    Superseded,
    /// the event ended between submitting and scoring: the submission stands unscored
    Unscored,
}

/// Turns a submission into a check batch for its team (run by the queue's workers).
pub fn expand_submission(
    conn: &Connection,
    submission_id: i64,
    check_attempts: u32,
    now_ms: i64,
) -> Result<Scoring, Error> {
    let row: Option<(i64, i64, String)> = conn
        .query_row(
            "SELECT event_id, team_id, version FROM submissions WHERE id = ?1",
            [submission_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let Some((event_id, team_id, version)) = row else {
        return Err(Error::NotFound("submission"));
    };
    let newer: bool = conn.query_row(
        "SELECT EXISTS(SELECT 1 FROM submissions WHERE team_id = ?1 AND id > ?2)",
        params![team_id, submission_id],
        |r| r.get(0),
    )?;
    if newer {
        return Ok(Scoring::Superseded);
    }
    let outstanding: bool = conn.query_row(
        "SELECT EXISTS(SELECT 1 FROM check_runs r JOIN check_batches b ON b.id = r.batch_id
                       WHERE r.team_id = ?1 AND r.state IN ('queued', 'running') AND b.requested_by LIKE 'submission:%')",
        [team_id],
        |r| r.get(0),
    )?;
    if outstanding {
        return Ok(Scoring::Wait);
    }
    let request = crate::checks::BatchRequest {
        event_id,
        team_id: Some(team_id),
        check_name: None,
        reason: format!("submission {version}"),
        requested_by: format!("submission:{submission_id}"),
        max_attempts: check_attempts,
        priority: 5,
    };
    match crate::checks::queue_batch(conn, &request, now_ms) {
        Ok(queued) => Ok(Scoring::Queued(queued.batch_id)),
        Err(Error::Conflict { .. }) => Ok(Scoring::Unscored),
        Err(other) => Err(other),
    }
}
