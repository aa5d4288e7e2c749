//! The browser terminal: a single-use ticket, then a WebSocket bridged to the lab user's
//! shell over SSH.
//!
//! 1. `POST /api/v1/allocations/{id}/terminal-ticket` (the lab's own team, or staff)
//!    returns a ticket that lives 30 s, works once, and only with the same session.
//! 2. The browser opens `GET /api/v1/terminal` as a WebSocket (its session cookie comes
//!    along) and sends `{"ticket": "…", "cols": 80, "rows": 24}` as its first message: the
//!    ticket never appears in a URL.
//! 3. After `{"type":"ready"}`, binary frames carry keystrokes in and output out; a text
//!    frame `{"type":"resize","cols":…,"rows":…}` resizes the PTY; closing the socket
//!    closes the SSH channel. The desktop password stays in the appliance.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use labrack_streamer::terminal::{self, TerminalInput, TerminalOutput, TerminalTarget};
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::auth::{Caller, Principal, hash_secret, random_token};
use super::extract::ApiPath;
use super::problem::Problem;
use crate::audit;
use crate::error::Error;
use crate::labs;
use labrack_provisioner::roles;

const TICKET_TTL: Duration = Duration::from_secs(30);
const FIRST_MESSAGE_WAIT: Duration = Duration::from_secs(10);
/// How long a shell may read no input while more waits before further input is dropped.
const SHELL_STALL: Duration = Duration::from_secs(5);
/// Bytes a second of input read (and dropped) while the shell reads none: enough to reach a
/// closed tab's end within seconds, little enough that a flood costs next to nothing.
const DROPPED_INPUT_RATE: usize = 1024 * 1024;

/// What a ticket opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Terminal,
    /// the desktop stream; `interactive` for the lab's own team, view-only for staff
    Desktop {
        interactive: bool,
    },
}

/// What a ticket is good for.
#[derive(Debug, Clone)]
pub struct Ticket {
    pub allocation_id: i64,
    pub purpose: Purpose,
    session_hash: String,
    pub actor: String,
    expires: Instant,
}

/// Unused tickets one session may hold at once (they live 30 s).
pub const MAX_TICKETS_PER_SESSION: usize = 8;
/// Unused tickets held at once, in all.
pub const MAX_TICKETS: usize = 20_000;
/// Terminals one session has open at once, and one lab.
pub const MAX_TERMINALS_PER_SESSION: usize = 4;
pub const MAX_TERMINALS_PER_LAB: usize = 8;
/// Desktop viewers (each a WebRTC peer with its own UDP socket) one session has open at
/// once, and one lab.
pub const MAX_VIEWERS_PER_SESSION: usize = 4;
pub const MAX_VIEWERS_PER_LAB: usize = 16;

/// Outstanding terminal tickets, by hash; each is taken out on first use. Also counts what
/// is open (terminals, desktop viewers) per session and per lab, within the caps above.
#[derive(Debug, Default)]
pub struct TicketStore {
    tickets: Mutex<HashMap<String, Ticket>>,
    open: Mutex<OpenCounts>,
}

#[derive(Debug, Default)]
struct OpenCounts {
    by_session: HashMap<(bool, String), usize>,
    by_lab: HashMap<(bool, i64), usize>,
}

/// One open terminal or viewer, counted until dropped.
#[derive(Debug)]
pub struct Opened {
    store: std::sync::Arc<TicketStore>,
    terminal: bool,
    session_hash: String,
    allocation_id: i64,
}

impl Drop for Opened {
    fn drop(&mut self) {
        if let Ok(mut open) = self.store.open.lock() {
            let session = (self.terminal, self.session_hash.clone());
            if let Some(n) = open.by_session.get_mut(&session) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    open.by_session.remove(&session);
                }
            }
            if let Some(n) = open.by_lab.get_mut(&(self.terminal, self.allocation_id)) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    open.by_lab.remove(&(self.terminal, self.allocation_id));
                }
            }
        }
    }
}

impl TicketStore {
    /// A single-use ticket, unless the session already holds its share of unused ones.
    pub fn issue(
        &self,
        allocation_id: i64,
        purpose: Purpose,
        caller: &Caller,
    ) -> Result<String, Error> {
        self.insert(Ticket {
            allocation_id,
            purpose,
            session_hash: caller.token_hash.clone(),
            actor: caller.actor(),
            expires: Instant::now() + TICKET_TTL,
        })
    }

    fn insert(&self, ticket: Ticket) -> Result<String, Error> {
        let raw = random_token();
        let mut tickets = self
            .tickets
            .lock()
            .map_err(|_| Error::Internal("ticket store poisoned".into()))?;
        let now = Instant::now();
        tickets.retain(|_, t| t.expires > now);
        let held = tickets
            .values()
            .filter(|t| t.session_hash == ticket.session_hash)
            .count();
        if held >= MAX_TICKETS_PER_SESSION {
            return Err(Error::RateLimited {
                retry_after_secs: TICKET_TTL.as_secs(),
            });
        }
        if tickets.len() >= MAX_TICKETS {
            return Err(Error::Busy {
                detail: "too many tickets are outstanding; try again shortly".into(),
                retry_after_secs: 5,
            });
        }
        tickets.insert(hash_secret(&raw), ticket);
        Ok(raw)
    }

    /// Counts an open terminal (or desktop viewer) of this session on this lab, or refuses
    /// it when either is at its cap.
    pub fn open(
        self: &std::sync::Arc<Self>,
        terminal: bool,
        session_hash: &str,
        allocation_id: i64,
    ) -> Result<Opened, Error> {
        let (per_session, per_lab, what) = if terminal {
            (
                MAX_TERMINALS_PER_SESSION,
                MAX_TERMINALS_PER_LAB,
                "terminals",
            )
        } else {
            (
                MAX_VIEWERS_PER_SESSION,
                MAX_VIEWERS_PER_LAB,
                "desktop viewers",
            )
        };
        let mut open = self
            .open
            .lock()
            .map_err(|_| Error::Internal("open counts poisoned".into()))?;
        let session = (terminal, session_hash.to_owned());
        if open.by_session.get(&session).copied().unwrap_or(0) >= per_session {
            return Err(Error::conflict(
                None,
                format!("this session already has {per_session} {what} open; close one first"),
            ));
        }
        if open
            .by_lab
            .get(&(terminal, allocation_id))
            .copied()
            .unwrap_or(0)
            >= per_lab
        {
            return Err(Error::conflict(
                None,
                format!("this lab already has {per_lab} {what} open"),
            ));
        }
        *open.by_session.entry(session).or_default() += 1;
        *open.by_lab.entry((terminal, allocation_id)).or_default() += 1;
        Ok(Opened {
            store: self.clone(),
            terminal,
            session_hash: session_hash.to_owned(),
            allocation_id,
        })
    }

    /// Takes the ticket out (single use) if it exists, is fresh and belongs to `session_hash`.
    pub fn redeem(&self, raw: &str, session_hash: &str, terminal: bool) -> Result<Ticket, Error> {
        let ticket = self
            .tickets
            .lock()
            .ok()
            .and_then(|mut t| t.remove(&hash_secret(raw)));
        let what = if terminal { "terminal" } else { "desktop" };
        match ticket {
            None => Err(Error::Unauthenticated(format!(
                "unknown or already used {what} ticket"
            ))),
            Some(t) if t.expires <= Instant::now() => {
                Err(Error::Unauthenticated(format!("the {what} ticket expired")))
            }
            Some(t) if t.session_hash != session_hash => Err(Error::forbidden(format!(
                "the {what} ticket belongs to another session"
            ))),
            Some(t) if (t.purpose == Purpose::Terminal) != terminal => Err(Error::forbidden(
                format!("this ticket does not open a {what}"),
            )),
            Some(t) => Ok(t),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TerminalTicket {
    /// send it as the first WebSocket message; it works once, within `expires_in_secs`
    pub ticket: String,
    pub expires_in_secs: u64,
    /// the WebSocket path to open
    pub path: String,
}

/// Who may open a lab's terminal: its own team, or operators.
fn may_open(caller: &Caller, team_id: i64) -> Result<(), Error> {
    match &caller.principal {
        Principal::Participant { team_id: own, .. } if *own == team_id => Ok(()),
        Principal::Participant { .. } => Err(Error::NotFound("allocation")),
        Principal::Staff { .. } => caller.require_staff(&roles::OPERATORS).map(|_| ()),
    }
}

/// Issues a single-use ticket for the lab's browser terminal.
#[utoipa::path(post, operation_id = "terminal_ticket", path = "/v1/allocations/{allocation_id}/terminal-ticket", tag = "labs", params(("allocation_id" = i64, Path)),
    responses((status = 201, body = TerminalTicket), (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem),
        (status = 429, body = Problem, description = "this session holds as many unused tickets as it may")))]
pub async fn ticket(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<i64>,
) -> Result<(StatusCode, Json<TerminalTicket>), Error> {
    let view = state
        .db
        .read(move |conn| super::labs::load_view(conn, id))
        .await?;
    may_open(&caller, view.team_id)?;
    if let Principal::Participant { event_id, .. } = caller.principal {
        state
            .db
            .read(move |conn| {
                crate::events::require_participants_work(conn, event_id, "the terminal")
            })
            .await?;
    }
    if !view.desktop_ready || view.busy {
        return Err(Error::conflict(
            None,
            format!(
                "the lab is {}{}; its terminal opens once it is active and idle",
                view.state,
                if view.busy { " (busy)" } else { "" }
            ),
        ));
    }
    let raw = state
        .terminal_tickets
        .issue(id, Purpose::Terminal, &caller)?;
    Ok((
        StatusCode::CREATED,
        Json(TerminalTicket {
            ticket: raw,
            expires_in_secs: TICKET_TTL.as_secs(),
            path: "/api/v1/terminal".into(),
        }),
    ))
}

use labrack_wire::terminal::{Control, Hello};

/// Cross-site WebSocket hijacking: a browser always sends Origin; it must be us.
pub fn same_origin(headers: &HeaderMap) -> Result<(), Error> {
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let origin_host = origin.split_once("://").map_or("", |(_, rest)| rest);
        if origin_host != host {
            return Err(Error::forbidden(
                "the WebSocket must be opened from the appliance's own pages",
            ));
        }
    }
    Ok(())
}

/// The terminal WebSocket (see the module docs for the protocol).
pub async fn socket(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Result<Response, Error> {
    same_origin(&headers)?;
    Ok(upgrade
        .max_message_size(64 * 1024)
        .on_upgrade(move |ws| async move {
            if let Err(error) = bridge(state, caller, ws).await {
                tracing::info!(%error, "terminal ended");
            }
        }))
}

pub(crate) fn json_text(value: serde_json::Value) -> Message {
    Message::Text(value.to_string().into())
}

/// Records a ticket that did not open what it was shown for (stolen, replayed, another
/// session's); the refusal stands whether or not the row could be written.
pub(crate) async fn audit_ticket_refused(
    state: &AppState,
    caller: &Caller,
    action: &'static str,
    error: &Error,
) {
    let (actor, meta, detail) = (caller.actor(), caller.meta.clone(), error.to_string());
    let written = state
        .db
        .writer()
        .write(move |conn| {
            audit::record(
                conn,
                &actor,
                &meta,
                action,
                None,
                serde_json::json!({"detail": detail}),
            )
        })
        .await;
    if let Err(error) = written {
        tracing::warn!(action, error = ?Error::from(error), "a refused ticket could not be audited");
    }
}

pub(crate) async fn refuse(mut ws: WebSocket, detail: &str) -> anyhow::Result<()> {
    let _ = ws
        .send(json_text(
            serde_json::json!({"type": "error", "detail": detail}),
        ))
        .await;
    let _ = ws.send(Message::Close(None)).await;
    anyhow::bail!("{detail}")
}

async fn bridge(state: AppState, caller: Caller, mut ws: WebSocket) -> anyhow::Result<()> {
    let first = match tokio::time::timeout(FIRST_MESSAGE_WAIT, ws.recv()).await {
        Ok(Some(Ok(Message::Text(text)))) => text,
        _ => return refuse(ws, "send {\"ticket\": …} as the first message").await,
    };
    let hello: Hello = match serde_json::from_str(first.as_str()) {
        Ok(hello) => hello,
        Err(e) => {
            return refuse(
                ws,
                &format!("the first message is not a terminal hello: {e}"),
            )
            .await;
        }
    };
    let ticket = match state
        .terminal_tickets
        .redeem(&hello.ticket, &caller.token_hash, true)
    {
        Ok(ticket) => ticket,
        Err(error) => {
            audit_ticket_refused(&state, &caller, "terminal.ticket_refused", &error).await;
            return refuse(ws, &error.to_string()).await;
        }
    };
    let _opened = match state
        .terminal_tickets
        .open(true, &caller.token_hash, ticket.allocation_id)
    {
        Ok(opened) => opened,
        Err(error) => return refuse(ws, &error.to_string()).await,
    };
    let secrets = state.secrets.clone();
    let allocation_id = ticket.allocation_id;
    let desktop = state
        .db
        .read(move |conn| labs::desktop_secret(conn, &secrets, allocation_id))
        .await;
    let desktop = match desktop {
        Ok(Some(desktop)) => desktop,
        Ok(None) => return refuse(ws, "the lab is no longer active").await,
        Err(error) => return refuse(ws, &error.to_string()).await,
    };
    let Some(host_key) = desktop.ssh_host_key.clone() else {
        return refuse(
            ws,
            "the lab host did not report its SSH host key; the terminal cannot verify it",
        )
        .await;
    };
    let target = TerminalTarget {
        host: desktop.host_address,
        port: desktop.ssh_port,
        username: desktop.username,
        password: desktop.password,
        host_key,
    };
    let (cols, rows) = (hello.cols, hello.rows);
    let opened = tokio::task::spawn_blocking(move || terminal::open(&target, cols, rows)).await?;
    let mut term = match opened {
        Ok(term) => term,
        Err(error) => return refuse(ws, &error.to_string()).await,
    };
    let actor = ticket.actor.clone();
    let meta = caller.meta.clone();
    state
        .db
        .writer()
        .write(move |conn| {
            audit::record(
                conn,
                &actor,
                &meta,
                "terminal.opened",
                Some(&format!("allocation:{allocation_id}")),
                serde_json::json!({}),
            )
        })
        .await
        .map_err(|e| anyhow::anyhow!("{:?}", Error::from(e)))?;
    ws.send(json_text(serde_json::json!({"type": "ready"})))
        .await?;
    let revoked = super::auth::until_revoked(&state, caller.token_hash.clone(), true);
    tokio::pin!(revoked);
    // Input the shell's queue had no room for: while one waits, the WebSocket is not read
    // (so TCP pushes back on the browser) but output keeps flowing, so neither side can
    // wait on the other for ever. A shell that reads nothing for SHELL_STALL (`sleep 1d`
    // under a keystroke flood) gets what is typed meanwhile dropped, as a full tty drops
    // it: the socket is read again, so a closed tab is noticed and ends the shell.
    let mut held: Option<TerminalInput> = None;
    let mut dropping = false;
    let mut dropped_bytes = 0_usize;
    let stall = tokio::time::sleep(SHELL_STALL);
    tokio::pin!(stall);
    loop {
        tokio::select! {
            permit = term.input.reserve(), if held.is_some() => match (permit, held.take()) {
                (Ok(permit), Some(message)) => {
                    permit.send(message);
                    dropping = false;
                }
                _ => break,
            },
            () = &mut stall, if held.is_some() && !dropping => {
                dropping = true;
                tracing::warn!(allocation_id, "the lab's shell has read no input for {SHELL_STALL:?}: dropping what is typed until it does");
            }
            incoming = ws.recv(), if held.is_none() || dropping => {
                let input = match incoming {
                    Some(Ok(Message::Binary(bytes))) => TerminalInput::Data(bytes.to_vec()),
                    Some(Ok(Message::Text(text))) => match serde_json::from_str::<Control>(text.as_str()) {
                        Ok(Control::Resize { cols, rows }) => TerminalInput::Resize { cols, rows },
                        Err(e) => {
                            let _ = ws.send(json_text(serde_json::json!({"type": "error", "detail": format!("unknown control message: {e}")}))).await;
                            continue;
                        }
                    },
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                };
                if dropping {
                    if let TerminalInput::Data(bytes) = &input {
                        dropped_bytes += bytes.len();
                        // read what is dropped at DROPPED_INPUT_RATE at most: reading a
                        // flood at LAN speed would cost a core
                        let pause = bytes.len() as f64 / DROPPED_INPUT_RATE as f64;
                        tokio::time::sleep(Duration::from_secs_f64(pause)).await;
                    }
                    continue;
                }
                match term.input.try_send(input) {
                    Ok(()) => {}
                    Err(tokio::sync::mpsc::error::TrySendError::Full(message)) => {
                        held = Some(message);
                        stall.as_mut().reset(tokio::time::Instant::now() + SHELL_STALL);
                    }
                    Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => break,
                }
            }
            why = &mut revoked => {
                let _ = ws.send(json_text(serde_json::json!({"type": "error", "detail": why.to_string()}))).await;
                let _ = ws.send(Message::Close(None)).await;
                break;
            }
            outgoing = term.output.recv() => match outgoing {
                Some(TerminalOutput::Data(bytes)) => {
                    if ws.send(Message::Binary(bytes.into())).await.is_err() { break; }
                }
                Some(TerminalOutput::Exit(status)) => {
                    let _ = ws.send(json_text(serde_json::json!({"type": "exit", "status": status}))).await;
                    let _ = ws.send(Message::Close(None)).await;
                    break;
                }
                Some(TerminalOutput::Error(detail)) => {
                    let _ = ws.send(json_text(serde_json::json!({"type": "error", "detail": detail}))).await;
                    break;
                }
                None => break,
            },
        }
    }
    if dropped_bytes > 0 {
        tracing::warn!(
            allocation_id,
            dropped_bytes,
            "terminal input dropped while the lab's shell read none"
        );
    }
    // Closing the tab closes the channel: the pump sees Close (or a dropped sender).
    let _ = term.input.try_send(TerminalInput::Close);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticket(session: &str, ttl: Duration) -> Ticket {
        Ticket {
            allocation_id: 1,
            purpose: Purpose::Terminal,
            session_hash: session.into(),
            actor: "participant:1".into(),
            expires: Instant::now() + ttl,
        }
    }

    #[test]
    fn tickets_are_single_use_session_bound_and_expire() {
        let store = TicketStore::default();
        let raw = store.insert(ticket("s1", TICKET_TTL)).expect("issued");
        assert!(
            matches!(store.redeem(&raw, "s2", true), Err(Error::Forbidden(_))),
            "another session"
        );
        assert!(
            matches!(
                store.redeem(&raw, "s1", true),
                Err(Error::Unauthenticated(_))
            ),
            "a refused try still uses it up"
        );
        let raw = store.insert(ticket("s1", TICKET_TTL)).expect("issued");
        assert_eq!(
            store.redeem(&raw, "s1", true).expect("valid").allocation_id,
            1
        );
        assert!(
            matches!(
                store.redeem(&raw, "s1", true),
                Err(Error::Unauthenticated(_))
            ),
            "single use"
        );
        let stale = store.insert(ticket("s1", Duration::ZERO)).expect("issued");
        assert!(
            matches!(store.redeem(&stale, "s1", true), Err(Error::Unauthenticated(detail)) if detail.contains("expired"))
        );
        let desktop = store
            .insert(Ticket {
                purpose: Purpose::Desktop { interactive: true },
                ..ticket("s1", TICKET_TTL)
            })
            .expect("issued");
        assert!(
            matches!(store.redeem(&desktop, "s1", true), Err(Error::Forbidden(_))),
            "a desktop ticket opens no terminal"
        );
    }

    #[test]
    fn a_session_holds_a_bounded_number_of_tickets_terminals_and_viewers() {
        let store = std::sync::Arc::new(TicketStore::default());
        let held: Vec<String> = (0..MAX_TICKETS_PER_SESSION)
            .map(|_| store.insert(ticket("s1", TICKET_TTL)).expect("issued"))
            .collect();
        assert!(
            matches!(
                store.insert(ticket("s1", TICKET_TTL)),
                Err(Error::RateLimited { .. })
            ),
            "a ninth unused ticket"
        );
        assert!(
            store.insert(ticket("s2", TICKET_TTL)).is_ok(),
            "another session is not held back"
        );
        store.redeem(&held[0], "s1", true).expect("valid");
        assert!(
            store.insert(ticket("s1", TICKET_TTL)).is_ok(),
            "a used ticket frees its place"
        );
        let terminals: Vec<Opened> = (0..MAX_TERMINALS_PER_SESSION)
            .map(|_| store.open(true, "s1", 1).expect("open"))
            .collect();
        assert!(
            store.open(true, "s1", 1).is_err(),
            "a fifth terminal of one session"
        );
        assert!(
            store.open(false, "s1", 1).is_ok(),
            "viewers are counted apart"
        );
        let others: Vec<Opened> = (0..MAX_TERMINALS_PER_LAB - MAX_TERMINALS_PER_SESSION)
            .map(|n| store.open(true, &format!("o{n}"), 1).expect("open"))
            .collect();
        assert!(
            store.open(true, "late", 1).is_err(),
            "the lab's terminals are capped"
        );
        assert!(store.open(true, "late", 2).is_ok(), "another lab is not");
        drop(terminals);
        assert!(
            store.open(true, "s1", 1).is_ok(),
            "closed terminals give their places back"
        );
        drop(others);
    }
}
