//! Platform agents:
//!
//! - the **hint agent** answers a team's question from its failing checks, through the LLM
//!   gateway when a model is configured and the team's budget allows, else by rule;
//! - the **live observer** flags teams whose lab sits idle or whose checks keep failing
//!   (staff alerts), on a timer;
//! - **commentary** announces a change of leader (by rule, or in the model's words).
//!
//! Every message says where it came from (`llm` or `rules`): with no model configured the
//! agents still work, and say so.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension as _, params};

use crate::error::Error;
use crate::llm::{ChatMessage, LlmError, Payer};
use crate::store::Db;

/// The job kind of a team's question to the hint agent.
/// Checks failing this many times in a row raise an alert.
pub const FAILING_STREAK: usize = 3;
/// An alert is not repeated within this time.
const ALERT_QUIET_MS: i64 = 60 * 60 * 1000;
const NO_MODEL: &str = "(rule-based: no language model is configured)";

/// A failing visible check of a team: name and participant-facing message.
fn failing_checks(
    conn: &Connection,
    team_id: i64,
) -> Result<Vec<(String, String)>, rusqlite::Error> {
    let mut statement = conn.prepare_cached(
        "SELECT r.check_name, coalesce(r.message, 'failed') FROM check_runs r
         JOIN (SELECT max(id) AS id FROM check_runs WHERE team_id = ?1 AND state IN ('passed', 'failed') GROUP BY check_name COLLATE NOCASE) l
           ON l.id = r.id
         WHERE r.state = 'failed' AND r.hidden = 0 ORDER BY r.check_name",
    )?;
    let rows = statement.query_map([team_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// The rule-based hint: what fails and where to start.
pub fn rule_hint(failing: &[(String, String)], available_hints: usize) -> String {
    let mut text = match failing.first() {
        Some((name, message)) if failing.len() == 1 => format!("One visible check fails: “{name}” says: {message}. Start there."),
        Some((name, message)) => {
            let others: Vec<&str> = failing[1..].iter().map(|(n, _)| n.as_str()).collect();
            format!("{} visible checks fail. Start with “{name}”: {message}. Then: {}.", failing.len(), others.join(", "))
        }
        None => "Every visible check passes (or none has run yet): run your checks, then polish what the judges will see.".to_owned(),
    };
    if available_hints > 0 {
        text.push_str(&format!(
            " {available_hints} hint(s) can be unlocked on the Hints tab (some cost points)."
        ));
    }
    text
}

fn insert_message(
    conn: &Connection,
    event_id: i64,
    team_id: Option<i64>,
    agent: &str,
    source: &str,
    body: &str,
    now_ms: i64,
) -> Result<(), rusqlite::Error> {
    conn.execute(
        "INSERT INTO agent_messages (event_id, team_id, agent, source, body, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![event_id, team_id, agent, source, body, now_ms],
    )?;
    Ok(())
}

/// What the agents run with: the store, the way to a language model, and the stop signal.
#[derive(Clone)]
pub struct AgentContext {
    pub db: Db,
    pub llm: Arc<crate::llm::Gateway>,
    pub shutdown: Arc<tokio::sync::watch::Sender<bool>>,
}

/// A team's answered question, to post in the job's completing write.
#[derive(Debug, Clone)]
pub struct Answer {
    pub event_id: i64,
    pub team_id: i64,
    pub source: &'static str,
    pub body: String,
}

/// Posts the answer to the team's messages, once per job: a retried job whose answer is
/// already posted posts nothing.
pub fn post_answer(
    conn: &Connection,
    job_id: i64,
    answer: &Answer,
    now_ms: i64,
) -> Result<(), rusqlite::Error> {
    let posted: bool = conn.query_row(
        "SELECT EXISTS(SELECT 1 FROM agent_messages WHERE job_id = ?1)",
        [job_id],
        |r| r.get(0),
    )?;
    if !posted {
        conn.execute(
            "INSERT INTO agent_messages (event_id, team_id, agent, source, body, created_ms, job_id) VALUES (?1, ?2, 'hint', ?3, ?4, ?5, ?6)",
            params![answer.event_id, answer.team_id, answer.source, answer.body, now_ms, job_id],
        )?;
    }
    Ok(())
}

/// Answers one queued question (job `job_id`). The model is asked at most once per job: a
/// retry after the reply was recorded (and billed) uses that reply; a retry after the
/// answer was posted posts nothing new (see [`post_answer`]).
pub async fn answer_question(
    state: &AgentContext,
    job_id: i64,
    hint: &crate::jobs::AgentHint,
) -> Result<Answer, Error> {
    let (event_id, team_id, question) = (hint.event_id, hint.team_id, hint.question.clone());
    let (failing, hints, recorded) = state
        .db
        .read(move |conn| {
            let failing = failing_checks(conn, team_id)?;
            let hints: usize = conn.query_row(
                "SELECT count(*) FROM hints h WHERE h.event_id = ?1
                 AND NOT EXISTS (SELECT 1 FROM score_adjustments a WHERE a.team_id = ?2 AND a.hint_id = h.id AND a.kind = 'hint')",
                params![event_id, team_id],
                |r| r.get(0),
            )?;
            Ok::<_, Error>((failing, hints, crate::llm::recorded_reply(conn, job_id)?))
        })
        .await?;
    let rules = rule_hint(&failing, hints);
    let (source, body) = if let Some(reply) = recorded {
        ("llm", reply)
    } else if state.llm.configured() {
        let context: Vec<String> = failing
            .iter()
            .map(|(name, message)| format!("- check “{name}” fails: {message}"))
            .collect();
        let messages = vec![
            ChatMessage::system(
                "You are a hackathon mentor. Give one short, concrete hint (at most 4 sentences). Never write the full solution.",
            ),
            ChatMessage::user(format!(
                "The team asks: {question}\nTheir failing checks:\n{}",
                if context.is_empty() {
                    "(none)".to_owned()
                } else {
                    context.join("\n")
                }
            )),
        ];
        let payer = Payer {
            event_id,
            team_id: Some(team_id),
            job_id: Some(job_id),
        };
        match state
            .llm
            .chat(&state.db, payer, "hint", messages, 300)
            .await
        {
            Ok(reply) => ("llm", reply.content),
            Err(
                error @ (LlmError::BudgetExceeded { .. }
                | LlmError::RateLimited { .. }
                | LlmError::Unavailable(_)),
            ) => ("rules", format!("{rules} (rule-based: {error})")),
            Err(other) => return Err(Error::Internal(other.to_string())),
        }
    } else {
        ("rules", format!("{rules} {NO_MODEL}"))
    };
    Ok(Answer {
        event_id,
        team_id,
        source,
        body,
    })
}

/// What one observer pass found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Observed {
    pub alerts: Vec<(i64, i64, String, String)>,
}

/// One observer pass over live events, in a write: raises alerts for teams whose checks
/// failed [`FAILING_STREAK`] times in a row, and for labs idle longer than `idle_ms` (no
/// desktop or terminal opened by the team, no submission and no check request).
pub fn observe(conn: &Connection, now_ms: i64, idle_ms: i64) -> Result<Observed, rusqlite::Error> {
    let mut observed = Observed::default();
    let events: Vec<i64> = conn
        .prepare_cached("SELECT id FROM events WHERE state IN ('live', 'frozen')")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for event_id in events {
        let mut found: Vec<(Option<i64>, String, String)> = Vec::new();
        // Failing streaks: the last runs with a result of one check, all failed.
        let mut statement = conn.prepare_cached(
            "SELECT team_id, check_name, state FROM check_runs WHERE event_id = ?1 AND state IN ('passed', 'failed')
             ORDER BY team_id, check_name, id DESC",
        )?;
        let rows: Vec<(i64, String, String)> = statement
            .query_map([event_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        let mut streaks: HashMap<(i64, String), (usize, bool)> = HashMap::new();
        for (team_id, check, state) in rows {
            let entry = streaks
                .entry((team_id, check.to_lowercase()))
                .or_insert((0, true));
            if entry.1 {
                if state == "failed" {
                    entry.0 += 1;
                } else {
                    entry.1 = false;
                }
            }
        }
        let mut streaks: Vec<((i64, String), (usize, bool))> = streaks
            .into_iter()
            .filter(|(_, (n, _))| *n >= FAILING_STREAK)
            .collect();
        streaks.sort();
        for ((team_id, check), (n, _)) in streaks {
            found.push((
                Some(team_id),
                "failing_check".into(),
                format!("check “{check}” failed {n} times in a row"),
            ));
        }
        // Idle labs: active for a while, and nothing from the team since `idle_ms` ago.
        let since = now_ms - idle_ms;
        let since_text = crate::clock::format_time(
            time::OffsetDateTime::from_unix_timestamp(since / 1000)
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
        );
        let mut statement = conn.prepare_cached(
            "SELECT a.team_id, a.id FROM allocations a
             WHERE a.event_id = ?1 AND a.state = 'active' AND a.created_at <= ?2
               AND NOT EXISTS (SELECT 1 FROM audit_log l WHERE l.target = 'allocation:' || a.id AND l.at >= ?2
                               AND l.action IN ('terminal.opened', 'desktop.viewer_joined') AND l.actor LIKE 'participant:%')
               AND NOT EXISTS (SELECT 1 FROM submissions s WHERE s.team_id = a.team_id AND s.created_ms >= ?3)
               AND NOT EXISTS (SELECT 1 FROM check_batches b WHERE b.team_id = a.team_id AND b.reason = 'team request' AND b.created_ms >= ?3)",
        )?;
        let idle: Vec<(i64, i64)> = statement
            .query_map(params![event_id, since_text, since], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?
            .collect::<Result<_, _>>()?;
        for (team_id, _) in idle {
            found.push((
                Some(team_id),
                "idle_lab".into(),
                format!("no activity in the team's lab for {} min", idle_ms / 60_000),
            ));
        }
        for (team_id, kind, detail) in found {
            let recent: Option<i64> = conn
                .query_row(
                    "SELECT id FROM alerts WHERE event_id = ?1 AND team_id IS ?2 AND kind = ?3 AND detail = ?4 AND created_ms > ?5",
                    params![event_id, team_id, kind, detail, now_ms - ALERT_QUIET_MS],
                    |r| r.get(0),
                )
                .optional()?;
            if recent.is_some() {
                continue;
            }
            conn.execute(
                "INSERT INTO alerts (event_id, team_id, kind, detail, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![event_id, team_id, kind, detail, now_ms],
            )?;
            observed
                .alerts
                .push((event_id, team_id.unwrap_or_default(), kind, detail));
        }
    }
    Ok(observed)
}

/// Announces a new leader of each live event's board (by rule, or in the model's words).
pub async fn commentary(
    state: &AgentContext,
    leaders: &mut HashMap<i64, i64>,
) -> Result<(), Error> {
    let boards = state
        .db
        .read(|conn| {
            let events: Vec<i64> = conn
                .prepare_cached("SELECT id FROM events WHERE state = 'live'")?
                .query_map([], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            let mut boards = Vec::new();
            for event_id in events {
                let board = crate::scores::leaderboard(conn, event_id, None, None)?;
                if let Some(top) = board.rows.first().filter(|r| r.total > 0.0) {
                    boards.push((event_id, top.team_id, top.team.clone(), top.total));
                }
            }
            Ok::<_, Error>(boards)
        })
        .await?;
    for (event_id, team_id, team, total) in boards {
        if leaders.insert(event_id, team_id) == Some(team_id) {
            continue;
        }
        let rules = format!("{team} takes the lead with {total} points.");
        let (source, body) = if state.llm.configured() {
            let messages = vec![
                ChatMessage::system(
                    "You are a lively hackathon commentator. One sentence, no more than 25 words.",
                ),
                ChatMessage::user(rules.clone()),
            ];
            match state
                .llm
                .chat(
                    &state.db,
                    Payer {
                        event_id,
                        team_id: None,
                        job_id: None,
                    },
                    "commentary",
                    messages,
                    60,
                )
                .await
            {
                Ok(reply) => ("llm", reply.content),
                Err(error) => ("rules", format!("{rules} (rule-based: {error})")),
            }
        } else {
            ("rules", format!("{rules} {NO_MODEL}"))
        };
        state
            .db
            .writer()
            .write(move |conn| {
                Ok::<_, Error>(insert_message(
                    conn,
                    event_id,
                    None,
                    "commentary",
                    source,
                    &body,
                    crate::clock::now_ms(),
                )?)
            })
            .await?;
    }
    Ok(())
}

/// Runs the observer and commentary every `every` until shutdown.
pub async fn run_observer(state: AgentContext, every: Duration, idle: Duration) {
    let mut shutdown = state.shutdown.subscribe();
    let mut leaders = HashMap::new();
    let idle_ms = i64::try_from(idle.as_millis()).unwrap_or(i64::MAX);
    loop {
        let stop = tokio::select! {
            _ = tokio::time::sleep(every) => false,
            _ = shutdown.wait_for(|stop| *stop) => true,
        };
        if stop {
            return;
        }
        let observed = state
            .db
            .writer()
            .write(move |conn| Ok::<_, Error>(observe(conn, crate::clock::now_ms(), idle_ms)?))
            .await;
        match observed {
            Ok(found) => {
                for (event_id, team_id, kind, detail) in found.alerts {
                    tracing::warn!(event_id, team_id, %kind, %detail, "observer alert");
                }
            }
            Err(error) => tracing::error!(error = ?Error::from(error), "observer pass failed"),
        }
        if let Err(error) = commentary(&state, &mut leaders).await {
            tracing::error!(?error, "commentary failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_hints_point_at_the_first_failure() {
        let one = vec![("server up".to_owned(), "port 8080 is closed".to_owned())];
        assert_eq!(
            rule_hint(&one, 0),
            "One visible check fails: “server up” says: port 8080 is closed. Start there."
        );
        let two = vec![one[0].clone(), ("tests".to_owned(), "2 failed".to_owned())];
        assert!(rule_hint(&two, 2).starts_with("2 visible checks fail. Start with “server up”"));
        assert!(
            rule_hint(&two, 2)
                .ends_with("2 hint(s) can be unlocked on the Hints tab (some cost points).")
        );
        assert!(rule_hint(&[], 0).starts_with("Every visible check passes"));
    }
}
