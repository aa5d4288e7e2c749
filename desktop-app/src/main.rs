//! `labrack-console`: the staff console for a LabRack appliance (Tauri 2).
//!
//! The window's UI (`ui/`) calls the appliance's API through these commands, so every
//! request goes through a client that trusts only the appliance CA staff pinned by its
//! fingerprint — the webview itself never talks to the appliance. One API, two front ends:
//! the same `/api/v1` the browser UI uses.

#![cfg_attr(not(debug_assertions), windows_subsystem = "windows")]

mod badges;
mod pin;

use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tauri::Manager as _;

/// The appliance this window is connected to.
#[derive(Default)]
struct Connection {
    base: Option<String>,
    client: Option<reqwest::Client>,
    /// bearer session token (memory only)
    token: Option<String>,
}

#[derive(Default)]
struct AppState {
    connection: Mutex<Connection>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct RememberedAppliance {
    url: String,
    fingerprint: String,
    /// where the URL's host was found on the LAN (mDNS), when it was
    #[serde(default, skip_serializing_if = "Option::is_none")]
    address: Option<String>,
}

fn remembered_path(app: &tauri::AppHandle) -> Option<std::path::PathBuf> {
    app.path()
        .app_config_dir()
        .ok()
        .map(|dir| dir.join("appliances.json"))
}

fn load_remembered(app: &tauri::AppHandle) -> Vec<RememberedAppliance> {
    remembered_path(app)
        .and_then(|path| std::fs::read(path).ok())
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

fn remember(app: &tauri::AppHandle, appliance: RememberedAppliance) {
    let mut all = load_remembered(app);
    all.retain(|a| a.url != appliance.url);
    all.insert(0, appliance);
    if let Some(path) = remembered_path(app) {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = std::fs::write(path, serde_json::to_vec_pretty(&all).unwrap_or_default());
    }
}

fn normalize_url(url: &str) -> Result<String, String> {
    let parsed = reqwest::Url::parse(url.trim())
        .map_err(|_| format!("{url:?} is not a URL, e.g. https://10.0.0.2:8443"))?;
    if parsed.scheme() != "https" {
        return Err("the appliance URL must start with https://".into());
    }
    Ok(parsed.as_str().trim_end_matches('/').to_owned())
}

/// Appliances connected to before (their CA pinned).
#[tauri::command]
fn remembered(app: tauri::AppHandle) -> Vec<RememberedAppliance> {
    load_remembered(&app)
}

/// Appliances announcing themselves on the LAN (mDNS), after listening for a few seconds.
#[tauri::command]
async fn discover() -> Result<Vec<labrack_discovery::Found>, String> {
    tokio::task::spawn_blocking(|| labrack_discovery::browse(std::time::Duration::from_secs(3)))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("could not look for appliances on this network: {e}"))
}

/// Connects to an appliance, pinning its CA by fingerprint; checks it answers. `address` (from
/// discovery) is where the URL's host is reached, as `IP:PORT`.
#[tauri::command]
async fn connect(
    app: tauri::AppHandle,
    state: tauri::State<'_, AppState>,
    url: String,
    fingerprint: String,
    address: Option<String>,
) -> Result<String, String> {
    let base = normalize_url(&url)?;
    let fingerprint = pin::normalize(&fingerprint)?;
    let address = address.filter(|a| !a.trim().is_empty());
    let resolve = match &address {
        Some(text) => {
            let at: std::net::SocketAddr = text
                .trim()
                .parse()
                .map_err(|_| format!("{text:?} is not an address (IP:PORT)"))?;
            let host = reqwest::Url::parse(&base)
                .ok()
                .and_then(|u| u.host_str().map(str::to_owned))
                .ok_or("the URL has no host")?;
            Some((host, at))
        }
        None => None,
    };
    let client = pin::client(
        &fingerprint,
        resolve.as_ref().map(|(host, at)| (host.as_str(), *at)),
    )?;
    let health = client.get(format!("{base}/healthz")).send().await.map_err(|e| {
        let text = format!("{e:?}");
        if text.contains("does not match the fingerprint") {
            "the appliance's CA does not match the fingerprint you entered: check it against what `labrack serve` printed".to_owned()
        } else {
            format!("could not reach the appliance at {base}: {e}")
        }
    })?;
    if !health.status().is_success() {
        return Err(format!("the appliance answered {}", health.status()));
    }
    let mut connection = state.connection.lock().map_err(|_| "state lock poisoned")?;
    *connection = Connection {
        base: Some(base.clone()),
        client: Some(client),
        token: None,
    };
    drop(connection);
    remember(
        &app,
        RememberedAppliance {
            url: base.clone(),
            fingerprint,
            address,
        },
    );
    Ok(base)
}

fn connected(
    state: &tauri::State<'_, AppState>,
) -> Result<(reqwest::Client, String, Option<String>), String> {
    let connection = state.connection.lock().map_err(|_| "state lock poisoned")?;
    match (&connection.client, &connection.base) {
        (Some(client), Some(base)) => Ok((client.clone(), base.clone(), connection.token.clone())),
        _ => Err("not connected to an appliance".into()),
    }
}

/// Why a call failed, as the webview gets it: the appliance's problem document exactly as
/// it was sent (so the screen can name the field at fault, as the web UI does), or a
/// sentence for what failed before any answer (unreachable, not connected).
type Failure = serde_json::Value;

async fn answer(response: reqwest::Response) -> Result<serde_json::Value, Failure> {
    let status = response.status();
    let text = response.text().await.map_err(|e| e.to_string())?;
    let parsed: Option<serde_json::Value> = serde_json::from_str(&text).ok();
    if status.is_success() {
        return Ok(parsed.unwrap_or(serde_json::Value::String(text)));
    }
    match parsed {
        Some(problem)
            if problem
                .get("detail")
                .is_some_and(serde_json::Value::is_string) =>
        {
            Err(problem)
        }
        // Not a problem document (a proxy's page, say): one in the same shape.
        _ => Err(serde_json::json!({
            "type": "about:blank",
            "status": status.as_u16(),
            "title": status.canonical_reason().unwrap_or("error"),
            "detail": text.chars().take(500).collect::<String>(),
        })),
    }
}

/// A failure in one line, for places that show no fields (a wall tile's caption).
fn sentence(failure: &Failure) -> String {
    match (failure["status"].as_u64(), failure["detail"].as_str()) {
        (Some(status), Some(detail)) => format!("{status}: {detail}"),
        _ => failure
            .as_str()
            .map_or_else(|| failure.to_string(), str::to_owned),
    }
}

/// Logs in as staff; the session token stays in this process.
#[tauri::command]
async fn login(
    state: tauri::State<'_, AppState>,
    username: String,
    password: String,
) -> Result<serde_json::Value, Failure> {
    let (client, base, _) = connected(&state)?;
    let response = client
        .post(format!("{base}/api/v1/auth/login"))
        .json(&serde_json::json!({"username": username, "password": password, "bearer": true}))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let body = answer(response).await?;
    let token = body["token"]
        .as_str()
        .ok_or("the appliance gave no session token")?
        .to_owned();
    state
        .connection
        .lock()
        .map_err(|_| "state lock poisoned")?
        .token = Some(token);
    Ok(body["principal"].clone())
}

/// Calls the appliance's API (`/api/v1/…` only) as the logged-in staff member.
#[tauri::command]
async fn api(
    state: tauri::State<'_, AppState>,
    method: String,
    path: String,
    body: Option<serde_json::Value>,
    csv: Option<String>,
) -> Result<serde_json::Value, Failure> {
    if !path.starts_with("/api/v1/") || path.contains("..") {
        return Err("only /api/v1/ paths may be called".into());
    }
    let (client, base, token) = connected(&state)?;
    let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes())
        .map_err(|_| Failure::from("bad method"))?;
    let mut request = client.request(method, format!("{base}{path}"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(csv) = csv {
        request = request
            .header(reqwest::header::CONTENT_TYPE, "text/csv")
            .body(csv);
    } else if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request
        .send()
        .await
        .map_err(|e| format!("the appliance is unreachable: {e}"))?;
    answer(response).await
}

/// A lab desktop's latest picture (view-only), as a `data:` URL for an `<img>`.
#[tauri::command]
async fn thumbnail(
    state: tauri::State<'_, AppState>,
    allocation_id: i64,
) -> Result<String, String> {
    use base64::Engine as _;
    let (client, base, token) = connected(&state)?;
    let mut request = client.get(format!(
        "{base}/api/v1/allocations/{allocation_id}/thumbnail"
    ));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request
        .send()
        .await
        .map_err(|e| format!("the appliance is unreachable: {e}"))?;
    let is_jpeg = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == b"image/jpeg");
    if !response.status().is_success() {
        return Err(answer(response)
            .await
            .err()
            .map(|failure| sentence(&failure))
            .unwrap_or_default());
    }
    if !is_jpeg {
        return Err("the appliance sent no picture".into());
    }
    let jpeg = response.bytes().await.map_err(|e| e.to_string())?;
    Ok(format!(
        "data:image/jpeg;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&jpeg)
    ))
}

/// Shows a desktop notification (the freedesktop notification service on Linux).
#[tauri::command]
async fn notify(title: String, body: String) -> Result<(), String> {
    let title: String = title.chars().take(120).collect();
    let body: String = body.chars().take(500).collect();
    tokio::task::spawn_blocking(move || {
        notify_rust::Notification::new()
            .appname("LabRack console")
            .summary(&title)
            .body(&body)
            .show()
            .map(|_| ())
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("desktop notifications are unavailable here: {e}"))
}

/// The largest roster file the console reads (the appliance takes at most 1 MiB of CSV).
const MAX_ROSTER_BYTES: u64 = 1024 * 1024;

/// Where a save dialog starts: the user's documents folder, else home.
fn documents(app: &tauri::AppHandle) -> Option<std::path::PathBuf> {
    app.path()
        .document_dir()
        .ok()
        .filter(|d| d.is_dir())
        .or_else(|| app.path().home_dir().ok())
}

/// Asks where to save `bytes` (a native save dialog); returns the path, or None if cancelled.
async fn save_with_dialog(
    app: &tauri::AppHandle,
    title: &str,
    file_name: &str,
    filter: (&str, &str),
    bytes: Vec<u8>,
) -> Result<Option<String>, String> {
    use tauri_plugin_dialog::DialogExt as _;
    let mut dialog = app
        .dialog()
        .file()
        .set_title(title)
        .set_file_name(file_name)
        .add_filter(filter.0, &[filter.1]);
    if let Some(dir) = documents(app) {
        dialog = dialog.set_directory(dir);
    }
    let chosen = tokio::task::spawn_blocking(move || dialog.blocking_save_file())
        .await
        .map_err(|e| e.to_string())?;
    let Some(chosen) = chosen else {
        return Ok(None);
    };
    let path = chosen
        .into_path()
        .map_err(|e| format!("that is not a local file: {e}"))?;
    std::fs::write(&path, bytes).map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(Some(path.display().to_string()))
}

/// Saves join-code badges as a PDF where staff choose (a native save dialog); returns the
/// file's path, or None if they cancelled.
#[tauri::command]
async fn save_badges(
    app: tauri::AppHandle,
    event: String,
    event_code: String,
    badges: Vec<badges::Badge>,
) -> Result<Option<String>, String> {
    if badges.is_empty() {
        return Err("no join codes to print: they are shown once, right after an import".into());
    }
    let safe_code: String = event_code
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect();
    let pdf = badges::pdf(&event, &event_code, &badges)?;
    save_with_dialog(
        &app,
        "Save join-code badges",
        &format!("badges-{safe_code}.pdf"),
        ("PDF", "pdf"),
        pdf,
    )
    .await
}

/// Saves text the appliance sent (a CSV export) where staff choose; None if cancelled.
#[tauri::command]
async fn save_text(
    app: tauri::AppHandle,
    title: String,
    file_name: String,
    text: String,
) -> Result<Option<String>, String> {
    let safe_name: String = file_name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect();
    save_with_dialog(&app, &title, &safe_name, ("CSV", "csv"), text.into_bytes()).await
}

/// Reads a roster CSV staff pick in a native open dialog; None if they cancelled.
#[tauri::command]
async fn pick_roster(app: tauri::AppHandle) -> Result<Option<String>, String> {
    use tauri_plugin_dialog::DialogExt as _;
    let mut dialog = app
        .dialog()
        .file()
        .set_title("Choose a roster CSV (team,name,email)")
        .add_filter("CSV", &["csv", "txt"]);
    if let Some(dir) = documents(&app) {
        dialog = dialog.set_directory(dir);
    }
    let chosen = tokio::task::spawn_blocking(move || dialog.blocking_pick_file())
        .await
        .map_err(|e| e.to_string())?;
    let Some(chosen) = chosen else {
        return Ok(None);
    };
    let path = chosen
        .into_path()
        .map_err(|e| format!("that is not a local file: {e}"))?;
    let size = std::fs::metadata(&path)
        .map_err(|e| format!("reading {}: {e}", path.display()))?
        .len();
    if size > MAX_ROSTER_BYTES {
        return Err(format!(
            "{} is {size} bytes; a roster may be at most {MAX_ROSTER_BYTES} (split it)",
            path.display()
        ));
    }
    let bytes = std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    String::from_utf8(bytes).map(Some).map_err(|_| {
        format!(
            "{} is not UTF-8 text: save it as CSV (UTF-8)",
            path.display()
        )
    })
}

/// What the tray shows: the event's state (as the label beside the icon, the tooltip and the
/// menu's first line).
#[tauri::command]
fn set_tray(app: tauri::AppHandle, text: String) -> Result<(), String> {
    let text: String = text.chars().take(80).collect();
    if let Some(icon) = app.tray_by_id(TRAY_ID) {
        icon.set_title(Some(&text)).map_err(|e| e.to_string())?;
        icon.set_tooltip(Some(&format!("LabRack console: {text}")))
            .map_err(|e| e.to_string())?;
    }
    // No tray on this desktop (see `main`): the window still shows the state.
    match app.try_state::<TrayState>() {
        Some(tray) => tray.state_line.set_text(&text).map_err(|e| e.to_string()),
        None => Ok(()),
    }
}

const TRAY_ID: &str = "labrack-console";

/// The tray menu's first, informational line.
struct TrayState {
    state_line: tauri::menu::MenuItem<tauri::Wry>,
}

/// The tray icon: the event's state at a glance, a way back to the window, and Quit.
fn build_tray(app: &tauri::App) -> tauri::Result<()> {
    use tauri::menu::{Menu, MenuItem, PredefinedMenuItem};
    let state_line = MenuItem::with_id(app, "state", "Not connected", false, None::<&str>)?;
    let show = MenuItem::with_id(app, "show", "Show the console", true, None::<&str>)?;
    let quit = MenuItem::with_id(app, "quit", "Quit", true, None::<&str>)?;
    let menu = Menu::with_items(
        app,
        &[
            &state_line,
            &PredefinedMenuItem::separator(app)?,
            &show,
            &quit,
        ],
    )?;
    let mut tray = tauri::tray::TrayIconBuilder::with_id(TRAY_ID)
        .menu(&menu)
        .title("LabRack")
        .tooltip("LabRack console: not connected")
        .on_menu_event(|app, event| match event.id().as_ref() {
            "show" => {
                if let Some(window) = app.get_webview_window("main") {
                    let _ = window.show();
                    let _ = window.unminimize();
                    let _ = window.set_focus();
                }
            }
            "quit" => app.exit(0),
            _ => {}
        });
    if let Some(icon) = app.default_window_icon() {
        tray = tray.icon(icon.clone());
    }
    tray.build(app)?;
    app.manage(TrayState { state_line });
    Ok(())
}

/// Forgets the session (the appliance stays connected).
#[tauri::command]
fn logout(state: tauri::State<'_, AppState>) -> Result<(), String> {
    state
        .connection
        .lock()
        .map_err(|_| "state lock poisoned")?
        .token = None;
    Ok(())
}

fn main() {
    let app = tauri::Builder::default()
        .manage(AppState::default())
        .plugin(tauri_plugin_dialog::init())
        .setup(|app| {
            // A desktop without a tray still gets the console.
            if let Err(error) = build_tray(app) {
                eprintln!("labrack-console: no tray icon: {error}");
            }
            Ok(())
        })
        .invoke_handler(tauri::generate_handler![
            remembered,
            connect,
            login,
            api,
            logout,
            save_badges,
            save_text,
            pick_roster,
            thumbnail,
            notify,
            set_tray,
            discover
        ])
        .build(tauri::generate_context!());
    match app {
        Ok(app) => app.run(|_, _| {}),
        Err(error) => {
            eprintln!("labrack-console: {error}");
            std::process::exit(1);
        }
    }
}
