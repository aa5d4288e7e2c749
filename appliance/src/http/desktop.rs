//! Desktops in the browser: a single-use ticket, then a WebSocket for signaling.
//!
//! 1. `POST /api/v1/allocations/{id}/desktop-ticket`: the lab's own team gets an
//!    interactive ticket; staff and judges a view-only one. 30 s, once, this session only.
//! 2. `GET /api/v1/desktop` (WebSocket): the first message is
//!    `{"ticket": "…", "offer": "<SDP>", "width": W, "height": H}` (the browser offers
//!    receive-only video and an "input" data channel; the optional size is its video area, so
//!    a desktop nobody watches yet starts at that size); the answer comes back as `{"type": "answer", "sdp": "…"}`, then
//!    `{"type": "stats", …}` every 2 s. Closing the socket ends the viewer.
//! 3. Then, both ways on the same socket (interactive viewers only; from a view-only viewer
//!    they are dropped and counted, and it is sent no clipboard):
//!    - `{"type": "clipboard", "text": "…"}`: the browser's clipboard text for the remote
//!      desktop, or (from the appliance) text copied there;
//!    - `{"type": "resize", "width": W, "height": H}`: the viewer's window in CSS pixels
//!      (200–3840 × 200–2160); the remote desktop follows where its server allows.
//!
//!    Anything else is answered `{"type": "rejected", "detail": "…"}` and changes nothing.
//!
//! One RDP session and one encode per desktop, shared by every viewer (`DesktopRegistry`);
//! a desktop nobody watches is dropped after a while.
//!
//! `GET /api/v1/allocations/{id}/thumbnail` (staff and judges): the desktop's latest picture
//! as a small JPEG (at most 480×270), for the console's wall of desktops. It rides the same
//! RDP session, needs no encoder, is view-only by nature, and is audited once per watcher
//! and lab every [`THUMBNAIL_AUDIT_EVERY`].

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse as _, Response};
use labrack_streamer::desktop::{DesktopStream, StreamSettings};
use labrack_streamer::webrtc::Viewer;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use super::auth::{Caller, Principal};
use super::extract::ApiPath;
use super::problem::Problem;
use super::terminal::{Purpose, json_text, refuse, same_origin};
use crate::audit;
use crate::error::Error;
use crate::labs;
use labrack_provisioner::roles;

/// The running desktop streams, by allocation.
#[derive(Debug, Default)]
pub struct DesktopRegistry {
    streams: Mutex<HashMap<i64, DesktopStream>>,
    /// when each (watcher, allocation) last had a thumbnail look audited
    thumbnail_audits: Mutex<HashMap<(String, i64), Instant>>,
}

/// Forgets stopped streams once a second until shutdown.
pub async fn run_reaper(
    desktops: Arc<DesktopRegistry>,
    shutdown: Arc<tokio::sync::watch::Sender<bool>>,
) {
    let mut shutdown = shutdown.subscribe();
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => desktops.reap(),
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

impl DesktopRegistry {
    /// The desktop's live stream, unless it stopped.
    fn get(&self, allocation_id: i64) -> Option<DesktopStream> {
        self.streams
            .lock()
            .ok()?
            .get(&allocation_id)
            .filter(|stream| !stream.stopped())
            .cloned()
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
        if let Ok(mut audits) = self.thumbnail_audits.lock() {
            audits.retain(|_, at| at.elapsed() < THUMBNAIL_AUDIT_EVERY);
        }
    }

    /// The audit of a thumbnail watch failed: the next look starts the watch again.
    fn forget_thumbnail_watch(&self, actor: &str, allocation_id: i64) {
        if let Ok(mut audits) = self.thumbnail_audits.lock() {
            audits.remove(&(actor.to_owned(), allocation_id));
        }
    }

    /// Whether this look at a thumbnail starts a new audited watch (not one every poll).
    fn thumbnail_watch_starts(&self, actor: &str, allocation_id: i64) -> bool {
        let Ok(mut audits) = self.thumbnail_audits.lock() else {
            return true;
        };
        let key = (actor.to_owned(), allocation_id);
        match audits.get(&key) {
            Some(at) if at.elapsed() < THUMBNAIL_AUDIT_EVERY => false,
            _ => {
                audits.insert(key, Instant::now());
                true
            }
        }
    }

    /// Ends one desktop's stream (its session and password are about to change: reset,
    /// release); its viewers are disconnected and reconnect to a fresh one.
    pub fn forget(&self, allocation_id: i64) {
        let stream = self
            .streams
            .lock()
            .ok()
            .and_then(|mut streams| streams.remove(&allocation_id));
        if let Some(stream) = stream {
            stream.stop();
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DesktopTicket {
    pub ticket: String,
    /// "interactive" (the lab's own team while the event runs) or "view" (staff, judges, and
    /// the team once the event has ended)
    pub mode: String,
    pub expires_in_secs: u64,
    pub path: String,
}

/// Issues a single-use ticket to watch (staff) or use (its team) a lab's desktop.
#[utoipa::path(post, operation_id = "desktop_ticket", path = "/v1/allocations/{allocation_id}/desktop-ticket", tag = "labs", params(("allocation_id" = i64, Path)),
    responses((status = 201, body = DesktopTicket), (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem),
        (status = 429, body = Problem, description = "this session holds as many unused tickets as it may")))]
pub async fn ticket(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<i64>,
) -> Result<(StatusCode, Json<DesktopTicket>), Error> {
    let (view, event_state) = state
        .db
        .read(move |conn| {
            let view = super::labs::load_view(conn, id)?;
            let event_state: String = conn.query_row(
                "SELECT state FROM events WHERE id = ?1",
                [view.event_id],
                |r| r.get(0),
            )?;
            Ok::<_, Error>((view, event_state))
        })
        .await?;
    let interactive = match &caller.principal {
        // From the event's end on, the team watches its desktop while judges look.
        Principal::Participant { team_id, .. } if *team_id == view.team_id => {
            crate::events::participants_may_work(&event_state)
        }
        Principal::Participant { .. } => return Err(Error::NotFound("allocation")),
        Principal::Staff { .. } => {
            caller.require_staff(&roles::ALL_STAFF)?;
            false
        }
    };
    if !view.desktop_ready || view.busy {
        return Err(Error::conflict(
            None,
            format!(
                "the lab is {}{}; its desktop opens once it is active and idle",
                view.state,
                if view.busy { " (busy)" } else { "" }
            ),
        ));
    }
    let raw = state
        .terminal_tickets
        .issue(id, Purpose::Desktop { interactive }, &caller)?;
    let mode = if interactive { "interactive" } else { "view" };
    Ok((
        StatusCode::CREATED,
        Json(DesktopTicket {
            ticket: raw,
            mode: mode.into(),
            expires_in_secs: 30,
            path: "/api/v1/desktop".into(),
        }),
    ))
}

/// A thumbnail watch is audited again after this long.
pub const THUMBNAIL_AUDIT_EVERY: Duration = Duration::from_secs(600);
/// How long a request waits for a desktop's first picture before answering "not ready".
const FIRST_THUMBNAIL_WAIT: Duration = Duration::from_secs(8);

/// The lab desktop's latest picture, a JPEG of at most 480×270, view-only (staff, judges).
/// Asking keeps pictures coming for 20 s; a wall polls it every second or two.
#[utoipa::path(get, path = "/v1/allocations/{allocation_id}/thumbnail", tag = "labs", params(("allocation_id" = i64, Path)),
    responses((status = 200, content_type = "image/jpeg", description = "the picture; `x-labrack-taken` is when it was taken (ms since the epoch)"),
        (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem), (status = 502, body = Problem), (status = 503, body = Problem)))]
pub async fn thumbnail(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<i64>,
) -> Result<Response, Error> {
    caller.require_staff(&roles::ALL_STAFF)?;
    let view = state
        .db
        .read(move |conn| super::labs::load_view(conn, id))
        .await?;
    if !view.desktop_ready || view.busy {
        return Err(Error::conflict(
            None,
            format!(
                "the lab is {}{}; its desktop shows once it is active and idle",
                view.state,
                if view.busy { " (busy)" } else { "" }
            ),
        ));
    }
    let stream = stream_for(&state, id, (1280, 720))
        .await
        .map_err(|detail| {
            Error::Upstream(format!("the lab's desktop could not be opened: {detail}"))
        })?;
    let mut pictures = stream.want_thumbnails();
    let actor = caller.actor();
    if state.desktops.thumbnail_watch_starts(&actor, id) {
        let meta = caller.meta.clone();
        let audited_as = actor.clone();
        let recorded = state
            .db
            .writer()
            .write(move |conn| {
                audit::record(
                    conn,
                    &audited_as,
                    &meta,
                    "desktop.thumbnail_watched",
                    Some(&format!("allocation:{id}")),
                    serde_json::json!({"mode": "view"}),
                )
            })
            .await;
        // Nobody watches a desktop unrecorded: the next look tries the audit again.
        if let Err(error) = recorded {
            state.desktops.forget_thumbnail_watch(&actor, id);
            return Err(error.into());
        }
    }
    let picture = match tokio::time::timeout(
        FIRST_THUMBNAIL_WAIT,
        pictures.wait_for(Option::is_some),
    )
    .await
    {
        Ok(Ok(picture)) => picture.clone(),
        _ => None,
    };
    let Some(picture) = picture else {
        return Err(Error::NotReady {
            detail: "the lab's desktop is still connecting; ask again shortly".into(),
            retry_after_secs: 1,
        });
    };
    let taken = picture
        .taken
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut response = picture.jpeg.clone().into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/jpeg"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(value) = HeaderValue::from_str(&taken.to_string()) {
        headers.insert("x-labrack-taken", value);
    }
    Ok(response)
}

use labrack_wire::desktop::{MAX_DESKTOP, MIN_DESKTOP, ViewerMessage, viewer_message};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Hello {
    ticket: String,
    offer: String,
    /// the viewer's video area, so a new stream starts at that size (interactive viewers)
    #[serde(default)]
    width: Option<u32>,
    #[serde(default)]
    height: Option<u32>,
}

/// The size a new stream starts at: the interactive viewer's window where it is in range.
fn start_size(hello: &Hello, interactive: bool) -> (u16, u16) {
    match (hello.width, hello.height) {
        (Some(w), Some(h))
            if interactive
                && (MIN_DESKTOP..=MAX_DESKTOP.0).contains(&w)
                && (MIN_DESKTOP..=MAX_DESKTOP.1).contains(&h) =>
        {
            (
                u16::try_from(w & !1).unwrap_or(1280),
                u16::try_from(h).unwrap_or(720),
            )
        }
        _ => (1280, 720),
    }
}

/// The desktop signaling WebSocket (see the module docs).
pub async fn socket(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Result<Response, Error> {
    same_origin(&headers)?;
    Ok(upgrade
        .max_message_size(1024 * 1024)
        .on_upgrade(move |ws| async move {
            if let Err(error) = signal(state, caller, ws).await {
                tracing::info!(%error, "desktop viewer ended");
            }
        }))
}

async fn stream_for(
    state: &AppState,
    allocation_id: i64,
    (width, height): (u16, u16),
) -> Result<DesktopStream, String> {
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
    let target = desktop.rdp_target(width, height)?;
    let stream = tokio::task::spawn_blocking(move || {
        DesktopStream::start(target, StreamSettings::default())
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    Ok(state.desktops.put(allocation_id, stream))
}

async fn signal(state: AppState, caller: Caller, mut ws: WebSocket) -> anyhow::Result<()> {
    let first = match tokio::time::timeout(Duration::from_secs(10), ws.recv()).await {
        Ok(Some(Ok(Message::Text(text)))) => text,
        _ => {
            return refuse(
                ws,
                "send {\"ticket\": …, \"offer\": …} as the first message",
            )
            .await;
        }
    };
    let hello: Hello = match serde_json::from_str(first.as_str()) {
        Ok(hello) => hello,
        Err(e) => {
            return refuse(
                ws,
                &format!("the first message is not a desktop hello: {e}"),
            )
            .await;
        }
    };
    let ticket = match state
        .terminal_tickets
        .redeem(&hello.ticket, &caller.token_hash, false)
    {
        Ok(ticket) => ticket,
        Err(error) => {
            super::terminal::audit_ticket_refused(
                &state,
                &caller,
                "desktop.ticket_refused",
                &error,
            )
            .await;
            return refuse(ws, &error.to_string()).await;
        }
    };
    let Purpose::Desktop { interactive } = ticket.purpose else {
        return refuse(ws, "this ticket does not open a desktop").await;
    };
    // Each viewer is a WebRTC peer with a UDP socket of its own: capped per session and lab.
    let _opened = match state
        .terminal_tickets
        .open(false, &caller.token_hash, ticket.allocation_id)
    {
        Ok(opened) => opened,
        Err(error) => return refuse(ws, &error.to_string()).await,
    };
    let stream = match stream_for(
        &state,
        ticket.allocation_id,
        start_size(&hello, interactive),
    )
    .await
    {
        Ok(stream) => stream,
        Err(detail) => return refuse(ws, &detail).await,
    };
    let (mut viewer, answer) = match Viewer::answer(
        hello.offer,
        stream.clone(),
        interactive,
        state.webrtc_bind.clone(),
    )
    .await
    {
        Ok(answered) => answered,
        Err(error) => return refuse(ws, &error.to_string()).await,
    };
    let allocation_id = ticket.allocation_id;
    let mode = if interactive { "interactive" } else { "view" };
    let codec = viewer.codec.name();
    let (actor, meta) = (ticket.actor.clone(), caller.meta.clone());
    // Nobody watches a desktop unrecorded: no audit row, no picture.
    let recorded = state
        .db
        .writer()
        .write(move |conn| {
            audit::record(
                conn,
                &actor,
                &meta,
                "desktop.viewer_joined",
                Some(&format!("allocation:{allocation_id}")),
                serde_json::json!({"mode": mode, "codec": codec}),
            )
        })
        .await;
    if let Err(error) = recorded {
        tracing::warn!(error = ?Error::from(error), "a desktop watch could not be audited; refused");
        return refuse(
            ws,
            "the appliance could not record this watch; try again shortly",
        )
        .await;
    }
    let revoked = super::auth::until_revoked(&state, caller.token_hash.clone(), interactive);
    tokio::pin!(revoked);
    ws.send(json_text(serde_json::json!({"type": "answer", "sdp": answer, "mode": mode, "codec": viewer.codec.name()}))).await?;
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut remote_clipboard = stream.remote_clipboard();
    // Only text copied from now on goes to the browser.
    remote_clipboard.borrow_and_update();
    let mut dropped_messages = 0_u64;
    loop {
        tokio::select! {
            changed = remote_clipboard.changed(), if interactive => {
                if changed.is_err() { break; }
                let text = remote_clipboard.borrow_and_update().clone();
                if let Some(text) = text
                    && ws.send(json_text(serde_json::json!({"type": "clipboard", "text": &*text}))).await.is_err()
                {
                    break;
                }
            }
            _ = viewer.closed() => break,
            why = &mut revoked => {
                // An event that ended: the team's browser reconnects, view-only.
                let kind = if matches!(why, super::auth::Revoked::EventEnded(_)) { "restart" } else { "error" };
                let _ = ws.send(json_text(serde_json::json!({"type": kind, "detail": why.to_string()}))).await;
                let _ = ws.send(Message::Close(None)).await;
                break;
            }
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
                    "inputs_dropped": s.inputs_dropped.load(Ordering::Relaxed) + dropped_messages,
                    // the whole stream's: input past its queue (a flood), resizes a later one replaced
                    "stream_inputs_dropped": stream.stats.inputs_dropped.load(Ordering::Relaxed),
                    "resizes_coalesced": stream.stats.resizes_coalesced.load(Ordering::Relaxed),
                    "resizes": stream.stats.resizes.load(Ordering::Relaxed),
                    // what this viewer's receiver reports ask for, and what the shared encoder
                    // runs at (the lowest ask of all viewers)
                    "target_bps": s.target_bps.load(Ordering::Relaxed),
                    "fraction_lost": s.fraction_lost.load(Ordering::Relaxed),
                    "encoder_bps": stream.stats.bitrate_bps.load(Ordering::Relaxed),
                    "bitrate_changes": stream.stats.bitrate_changes.load(Ordering::Relaxed),
                    "keyframes": stream.stats.keyframes.load(Ordering::Relaxed),
                    // the appliance's own share of the latency: RDP update in → frame out
                    "change_to_send_ms": stream.stats.change_to_send_us.load(Ordering::Relaxed) as f64
                        / 1000.0 / stream.stats.changes_sent.load(Ordering::Relaxed).max(1) as f64,
                });
                if ws.send(json_text(stats)).await.is_err() { break; }
            }
            incoming = ws.recv() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(Message::Text(text))) => match viewer_message(text.as_str()) {
                    Ok(_) if !interactive => dropped_messages += 1,
                    Ok(ViewerMessage::Clipboard { text }) => stream.set_clipboard(text),
                    Ok(ViewerMessage::Resize { width, height }) => stream.resize(width, height),
                    Err(detail) => {
                        if ws.send(json_text(serde_json::json!({"type": "rejected", "detail": detail}))).await.is_err() { break; }
                    }
                },
                _ => {}
            },
        }
    }
    viewer.close().await;
    let dropped = viewer.stats.inputs_dropped.load(Ordering::Relaxed) + dropped_messages;
    let (actor, meta) = (ticket.actor, caller.meta);
    let _ = state
        .db
        .writer()
        .write(move |conn| {
            audit::record(
                conn,
                &actor,
                &meta,
                "desktop.viewer_left",
                Some(&format!("allocation:{allocation_id}")),
                serde_json::json!({"mode": mode, "inputs_dropped": dropped}),
            )
        })
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_stream_starts_at_the_interactive_viewers_size() {
        let hello = |w: Option<u32>, h: Option<u32>| Hello {
            ticket: String::new(),
            offer: String::new(),
            width: w,
            height: h,
        };
        assert_eq!(
            start_size(&hello(Some(1121), Some(748)), true),
            (1120, 748),
            "widths are even"
        );
        assert_eq!(
            start_size(&hello(Some(1120), Some(748)), false),
            (1280, 720),
            "watchers do not size the desktop"
        );
        assert_eq!(start_size(&hello(None, None), true), (1280, 720));
        assert_eq!(
            start_size(&hello(Some(9000), Some(748)), true),
            (1280, 720),
            "out of range falls back"
        );
    }
}
