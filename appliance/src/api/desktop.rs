//! Desktops in the browser: a single-use ticket, then a WebSocket for signaling.
//!
//! 1. `POST /api/v1/allocations/{id}/desktop-ticket`: the lab's own team gets an
//!    interactive ticket; staff and judges a view-only one. 30 s, once, this session only.
//! 2. `GET /api/v1/desktop` (WebSocket): the first message is
//!    `{"ticket": "…", "offer": "<SDP>"}` (the browser offers receive-only video and an
//!    "input" data channel); the answer comes back as `{"type": "answer", "sdp": "…"}`, then
//!    `{"type": "stats", …}` every 2 s. Closing the socket ends the viewer.
//!
//! One RDP session and one encode per desktop, shared by every viewer (`DesktopRegistry`);
//! a desktop nobody watches is dropped after a while.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use labrack_streamer::desktop::{DesktopStream, StreamSettings};
use labrack_streamer::webrtc::Viewer;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::{Caller, Principal, Role};
use super::error::{ApiError, Problem};
use super::extract::ApiPath;
use super::terminal::{Purpose, json_text, refuse, same_origin};
use super::{AppState, audit};
use crate::labs;

const WATCHERS: [Role; 4] = [Role::Admin, Role::Organizer, Role::Staff, Role::Judge];

/// The running desktop streams, by allocation.
#[derive(Debug, Default)]
pub struct DesktopRegistry {
    streams: Mutex<HashMap<i64, DesktopStream>>,
}

impl DesktopRegistry {
    /// The desktop's live stream, unless it stopped.
    fn get(&self, allocation_id: i64) -> Option<DesktopStream> {
        self.streams.lock().ok()?.get(&allocation_id).filter(|stream| !stream.stopped()).cloned()
    }

    /// Keeps `stream` unless another live one got there first (then that one is used).
    fn put(&self, allocation_id: i64, stream: DesktopStream) -> DesktopStream {
        match self.streams.lock() {
            Ok(mut streams) => match streams.get(&allocation_id) {
                Some(existing) if !existing.stopped() => existing.clone(),
                _ => {
                    streams.insert(allocation_id, stream.clone());
                    stream
                }
            },
            Err(_) => stream,
        }
    }

    /// Forgets streams that stopped (a stream stops itself after a while without viewers).
    pub fn reap(&self) {
        if let Ok(mut streams) = self.streams.lock() {
            streams.retain(|_, stream| !stream.stopped());
        }
    }

    /// Ends one desktop's stream (its session and password are about to change: reset,
    /// release); its viewers are disconnected and reconnect to a fresh one.
    pub fn forget(&self, allocation_id: i64) {
        let stream = self.streams.lock().ok().and_then(|mut streams| streams.remove(&allocation_id));
        if let Some(stream) = stream {
            stream.stop();
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DesktopTicket {
    pub ticket: String,
    /// "interactive" (the lab's own team) or "view" (staff, judges)
    pub mode: String,
    pub expires_in_secs: u64,
    pub path: String,
}

/// Issues a single-use ticket to watch (staff) or use (its team) a lab's desktop.
#[utoipa::path(post, path = "/api/v1/allocations/{allocation_id}/desktop-ticket", tag = "labs", params(("allocation_id" = i64, Path)),
    responses((status = 201, body = DesktopTicket), (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn ticket(State(state): State<AppState>, caller: Caller, ApiPath(id): ApiPath<i64>) -> Result<(StatusCode, Json<DesktopTicket>), ApiError> {
    let view = state.db.read(move |conn| super::labs::load_view(conn, id)).await?;
    let interactive = match &caller.principal {
        Principal::Participant { team_id, .. } if *team_id == view.team_id => true,
        Principal::Participant { .. } => return Err(ApiError::NotFound("allocation")),
        Principal::Staff { .. } => {
            caller.require_staff(&WATCHERS)?;
            false
        }
    };
    if !view.desktop_ready || view.busy {
        return Err(ApiError::conflict(None, format!("the lab is {}{}; its desktop opens once it is active and idle", view.state, if view.busy { " (busy)" } else { "" })));
    }
    let raw = state.terminal_tickets.issue(id, Purpose::Desktop { interactive }, &caller);
    let mode = if interactive { "interactive" } else { "view" };
    Ok((StatusCode::CREATED, Json(DesktopTicket { ticket: raw, mode: mode.into(), expires_in_secs: 30, path: "/api/v1/desktop".into() })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Hello {
    ticket: String,
    offer: String,
}

/// The desktop signaling WebSocket (see the module docs).
pub async fn socket(State(state): State<AppState>, caller: Caller, headers: HeaderMap, upgrade: WebSocketUpgrade) -> Result<Response, ApiError> {
    same_origin(&headers)?;
    Ok(upgrade.max_message_size(256 * 1024).on_upgrade(move |ws| async move {
        if let Err(error) = signal(state, caller, ws).await {
            tracing::info!(%error, "desktop viewer ended");
        }
    }))
}

async fn stream_for(state: &AppState, allocation_id: i64) -> Result<DesktopStream, String> {
    if let Some(stream) = state.desktops.get(allocation_id) {
        return Ok(stream);
    }
    let secrets = state.secrets.clone();
    let desktop = state
        .db
        .read(move |conn| labs::desktop_secret(conn, &secrets, allocation_id))
        .await
        .map_err(|e| e.to_string())?
        .ok_or("the lab is no longer active")?;
    let target = desktop.rdp_target(1280, 720)?;
    let stream = tokio::task::spawn_blocking(move || DesktopStream::start(target, StreamSettings::default()))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    Ok(state.desktops.put(allocation_id, stream))
}

async fn signal(state: AppState, caller: Caller, mut ws: WebSocket) -> anyhow::Result<()> {
    let first = match tokio::time::timeout(Duration::from_secs(10), ws.recv()).await {
        Ok(Some(Ok(Message::Text(text)))) => text,
        _ => return refuse(ws, "send {\"ticket\": …, \"offer\": …} as the first message").await,
    };
    let hello: Hello = match serde_json::from_str(first.as_str()) {
        Ok(hello) => hello,
        Err(e) => return refuse(ws, &format!("the first message is not a desktop hello: {e}")).await,
    };
    let ticket = match state.terminal_tickets.redeem(&hello.ticket, &caller.token_hash, false) {
        Ok(ticket) => ticket,
        Err(error) => return refuse(ws, &error.to_string()).await,
    };
    let Purpose::Desktop { interactive } = ticket.purpose else { return refuse(ws, "this ticket does not open a desktop").await };
    let stream = match stream_for(&state, ticket.allocation_id).await {
        Ok(stream) => stream,
        Err(detail) => return refuse(ws, &detail).await,
    };
    let (mut viewer, answer) = match Viewer::answer(hello.offer, stream.clone(), interactive, state.webrtc_bind.clone()).await {
        Ok(answered) => answered,
        Err(error) => return refuse(ws, &error.to_string()).await,
    };
    let allocation_id = ticket.allocation_id;
    let mode = if interactive { "interactive" } else { "view" };
    let (actor, meta) = (ticket.actor.clone(), caller.meta.clone());
    let _ = state
        .db
        .writer()
        .write(move |conn| audit(conn, &actor, &meta, "desktop.viewer_joined", Some(&format!("allocation:{allocation_id}")), serde_json::json!({"mode": mode})))
        .await;
    ws.send(json_text(serde_json::json!({"type": "answer", "sdp": answer, "mode": mode}))).await?;
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = viewer.closed() => break,
            // The lab was reset or released: this viewer reconnects to a fresh stream.
            _ = stream.ended() => {
                let _ = ws.send(json_text(serde_json::json!({"type": "restart", "detail": "the lab's desktop changed; reconnecting"}))).await;
                break;
            }
            _ = tick.tick() => {
                let s = &viewer.stats;
                let stats = serde_json::json!({
                    "type": "stats",
                    "frames": s.frames_sent.load(Ordering::Relaxed),
                    "bytes": s.bytes_sent.load(Ordering::Relaxed),
                    "keyframe_requests": s.keyframe_requests.load(Ordering::Relaxed),
                    "inputs_applied": s.inputs_applied.load(Ordering::Relaxed),
                    "inputs_dropped": s.inputs_dropped.load(Ordering::Relaxed),
                });
                if ws.send(json_text(stats)).await.is_err() { break; }
            }
            incoming = ws.recv() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                _ => {}
            },
        }
    }
    viewer.close().await;
    let dropped = viewer.stats.inputs_dropped.load(Ordering::Relaxed);
    let (actor, meta) = (ticket.actor, caller.meta);
    let _ = state
        .db
        .writer()
        .write(move |conn| {
            audit(conn, &actor, &meta, "desktop.viewer_left", Some(&format!("allocation:{allocation_id}")), serde_json::json!({"mode": mode, "inputs_dropped": dropped}))
        })
        .await;
    Ok(())
}
