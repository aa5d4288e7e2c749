//! Events as the domain sees them: what their state allows participants to do.

pub use labrack_provisioner::event::EventState;

use crate::error::Error;

/// [`EventState::participants_work`] for a stored state; an unknown one allows nothing.
pub fn participants_may_work(state: &str) -> bool {
    EventState::parse(state).is_some_and(EventState::participants_work)
}

/// Refuses a participant's lab work (terminal, reset) once their event has ended.
pub fn require_participants_work(
    conn: &rusqlite::Connection,
    event_id: i64,
    what: &str,
) -> Result<(), Error> {
    let state: String =
        conn.query_row("SELECT state FROM events WHERE id = ?1", [event_id], |r| {
            r.get(0)
        })?;
    if participants_may_work(&state) {
        Ok(())
    } else {
        Err(Error::conflict(
            Some("state"),
            format!(
                "the event is {state}: {what} is closed to participants; the desktop stays viewable"
            ),
        ))
    }
}
