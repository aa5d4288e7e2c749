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
}

fn remembered_path(app: &tauri::AppHandle) -> Option<std::path::PathBuf> {
    app.path().app_config_dir().ok().map(|dir| dir.join("appliances.json"))
}

fn load_remembered(app: &tauri::AppHandle) -> Vec<RememberedAppliance> {
    remembered_path(app).and_then(|path| std::fs::read(path).ok()).and_then(|bytes| serde_json::from_slice(&bytes).ok()).unwrap_or_default()
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
    let parsed = reqwest::Url::parse(url.trim()).map_err(|_| format!("{url:?} is not a URL, e.g. https://10.0.0.2:8443"))?;
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

/// Connects to an appliance, pinning its CA by fingerprint; checks it answers.
#[tauri::command]
async fn connect(app: tauri::AppHandle, state: tauri::State<'_, AppState>, url: String, fingerprint: String) -> Result<String, String> {
    let base = normalize_url(&url)?;
    let fingerprint = pin::normalize(&fingerprint)?;
    let client = pin::client(&fingerprint)?;
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
    *connection = Connection { base: Some(base.clone()), client: Some(client), token: None };
    drop(connection);
    remember(&app, RememberedAppliance { url: base.clone(), fingerprint });
    Ok(base)
}

fn connected(state: &tauri::State<'_, AppState>) -> Result<(reqwest::Client, String, Option<String>), String> {
    let connection = state.connection.lock().map_err(|_| "state lock poisoned")?;
    match (&connection.client, &connection.base) {
        (Some(client), Some(base)) => Ok((client.clone(), base.clone(), connection.token.clone())),
        _ => Err("not connected to an appliance".into()),
    }
}

async fn answer(response: reqwest::Response) -> Result<serde_json::Value, String> {
    let status = response.status();
    let text = response.text().await.map_err(|e| e.to_string())?;
    let body: serde_json::Value = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    if status.is_success() {
        Ok(body)
    } else {
        let detail = body["detail"].as_str().map(str::to_owned).unwrap_or_else(|| body.to_string());
        // Row errors of a CSV import, one per line, so staff can fix the file.
        let rows: Vec<String> = body["errors"]
            .as_array()
            .map(|errors| errors.iter().map(|e| format!("\nline {}: {}", e["line"], e["reason"].as_str().unwrap_or_default())).collect())
            .unwrap_or_default();
        Err(format!("{}: {detail}{}", status.as_u16(), rows.concat()))
    }
}

/// Logs in as staff; the session token stays in this process.
#[tauri::command]
async fn login(state: tauri::State<'_, AppState>, username: String, password: String) -> Result<serde_json::Value, String> {
    let (client, base, _) = connected(&state)?;
    let response = client
        .post(format!("{base}/api/v1/auth/login"))
        .json(&serde_json::json!({"username": username, "password": password, "bearer": true}))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let body = answer(response).await?;
    let token = body["token"].as_str().ok_or("the appliance gave no session token")?.to_owned();
    state.connection.lock().map_err(|_| "state lock poisoned")?.token = Some(token);
    Ok(body["principal"].clone())
}

/// Calls the appliance's API (`/api/v1/…` only) as the logged-in staff member.
#[tauri::command]
async fn api(state: tauri::State<'_, AppState>, method: String, path: String, body: Option<serde_json::Value>, csv: Option<String>) -> Result<serde_json::Value, String> {
    if !path.starts_with("/api/v1/") || path.contains("..") {
        return Err("only /api/v1/ paths may be called".into());
    }
    let (client, base, token) = connected(&state)?;
    let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).map_err(|_| "bad method")?;
    let mut request = client.request(method, format!("{base}{path}"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(csv) = csv {
        request = request.header(reqwest::header::CONTENT_TYPE, "text/csv").body(csv);
    } else if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.map_err(|e| format!("the appliance is unreachable: {e}"))?;
    answer(response).await
}

/// Saves join-code badges as a PDF in the console's data folder; returns the file's path.
#[tauri::command]
fn save_badges(app: tauri::AppHandle, event: String, event_code: String, badges: Vec<badges::Badge>) -> Result<String, String> {
    if badges.is_empty() {
        return Err("no join codes to print: they are shown once, right after an import".into());
    }
    let dir = app.path().app_data_dir().map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let safe_code: String = event_code.chars().filter(char::is_ascii_alphanumeric).collect();
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let path = dir.join(format!("badges-{safe_code}-{stamp}.pdf"));
    std::fs::write(&path, badges::pdf(&event, &event_code, &badges)).map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(path.display().to_string())
}

/// Forgets the session (the appliance stays connected).
#[tauri::command]
fn logout(state: tauri::State<'_, AppState>) -> Result<(), String> {
    state.connection.lock().map_err(|_| "state lock poisoned")?.token = None;
    Ok(())
}

fn main() {
    let app = tauri::Builder::default()
        .manage(AppState::default())
        .invoke_handler(tauri::generate_handler![remembered, connect, login, api, logout, save_badges])
        .build(tauri::generate_context!());
    match app {
        Ok(app) => app.run(|_, _| {}),
        Err(error) => {
            eprintln!("labrack-console: {error}");
            std::process::exit(1);
        }
    }
}
