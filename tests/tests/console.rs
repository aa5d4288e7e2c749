//! The Tauri staff console (`labrack-console`) under Xvfb, driven through tauri-driver and
//! WebKitWebDriver against a real `labrack serve`: a wrong CA fingerprint is refused, the
//! right one connects, staff log in, create an event, import a roster, and watch a real
//! `labrack-host` appear. A screenshot of the dashboard is saved.

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use labrack_e2e::{Api, DataDir, LabHost, LabUsers, Server, client_trusting, enrol_host, free_port};
use serde_json::{Value, json};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn console_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("LABRACK_CONSOLE_BIN") {
        return PathBuf::from(path);
    }
    labrack_e2e::labrack_bin().with_file_name("labrack-console")
}

/// Xvfb on a display it picks itself.
fn xvfb() -> anyhow::Result<(Killed, String)> {
    let mut child = Command::new("Xvfb")
        .args(["-displayfd", "1", "-screen", "0", "1280x800x24", "-nolisten", "tcp"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("Xvfb (apt xvfb)")?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    Ok((Killed(child), format!(":{}", line.trim())))
}

struct Driver {
    http: reqwest::Client,
    base: String,
    session: String,
}

impl Driver {
    async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let response = self.http.post(format!("{}/session/{}{path}", self.base, self.session)).json(&body).send().await?;
        let value: Value = response.json().await?;
        if value["value"]["error"].is_string() {
            anyhow::bail!("webdriver {path}: {}", value["value"]);
        }
        Ok(value["value"].clone())
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let value: Value = self.http.get(format!("{}/session/{}{path}", self.base, self.session)).send().await?.json().await?;
        if value["value"]["error"].is_string() {
            anyhow::bail!("webdriver {path}: {}", value["value"]);
        }
        Ok(value["value"].clone())
    }

    /// Finds an element by test id, waiting for the page to have it.
    async fn find(&self, testid: &str) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let found = self.post("/element", json!({"using": "css selector", "value": format!("[data-testid=\"{testid}\"]")})).await;
            match found {
                Ok(found) if found[ELEMENT].is_string() => return Ok(found[ELEMENT].as_str().unwrap_or_default().to_owned()),
                other if Instant::now() > deadline => {
                    let source = self.get("/source").await.unwrap_or_default();
                    anyhow::bail!("no element {testid}: {other:?}; the page is {}", source.to_string().chars().take(600).collect::<String>());
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Types into a field after clearing it; a newline is typed as the Enter key.
    async fn fill(&self, testid: &str, text: &str) -> anyhow::Result<()> {
        let id = self.find(testid).await?;
        self.post(&format!("/element/{id}/clear"), json!({})).await?;
        self.post(&format!("/element/{id}/value"), json!({"text": text.replace('\n', "\u{E007}")})).await?;
        Ok(())
    }

    async fn click(&self, testid: &str) -> anyhow::Result<()> {
        let id = self.find(testid).await?;
        self.post(&format!("/element/{id}/click"), json!({})).await?;
        Ok(())
    }

    async fn text(&self, testid: &str) -> anyhow::Result<String> {
        let id = self.find(testid).await?;
        Ok(self.get(&format!("/element/{id}/text")).await?.as_str().unwrap_or_default().to_owned())
    }

    async fn displayed(&self, testid: &str) -> anyhow::Result<bool> {
        let id = self.find(testid).await?;
        Ok(self.get(&format!("/element/{id}/displayed")).await?.as_bool().unwrap_or(false))
    }

    /// Waits until `testid`'s text contains `needle`.
    async fn wait_text(&self, testid: &str, needle: &str) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = self.text(testid).await.unwrap_or_default();
            if text.contains(needle) {
                return Ok(text);
            }
            if Instant::now() >= deadline {
                let source = self.get("/source").await.unwrap_or_default().as_str().unwrap_or_default().to_owned();
                let at = source.find(&format!("data-testid=\"{testid}\"")).unwrap_or(0);
                let html: String = source[at.saturating_sub(100)..].chars().take(700).collect();
                anyhow::bail!("{testid} never showed {needle:?}; it shows {text:?} ({html})");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn wait_displayed(&self, testid: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.displayed(testid).await.unwrap_or(false) {
            anyhow::ensure!(Instant::now() < deadline, "{testid} never appeared");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    async fn screenshot(&self, path: &Path) -> anyhow::Result<()> {
        use base64::Engine as _;
        let png = self.get("/screenshot").await?;
        let bytes = base64::engine::general_purpose::STANDARD.decode(png.as_str().unwrap_or_default())?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, bytes)?;
        Ok(())
    }
}

#[tokio::test]
async fn the_console_pins_the_ca_logs_in_creates_an_event_imports_a_roster_and_sees_a_host() -> anyhow::Result<()> {
    let console = console_bin();
    anyhow::ensure!(console.exists(), "{} is missing: cargo xtask test builds it", console.display());
    let data = DataDir::new("console");
    let server = Server::start(&data.0, "127.0.0.1:0")?;
    let mut admin = Api { client: client_trusting(&data.0)?, base: server.url.clone(), token: None };
    admin.first_admin_login(server.admin_password.as_deref().context("otp")?, "console-admin-password").await?;
    let fingerprint = server.ca_fingerprint.clone().context("fingerprint")?;

    let (_xvfb, display) = xvfb()?;
    let port = free_port()?;
    let native = free_port()?;
    let home = DataDir::new("console-home");
    let _driver = Killed(
        Command::new("tauri-driver")
            .args(["--port", &port.to_string(), "--native-port", &native.to_string(), "--native-driver", "/usr/bin/WebKitWebDriver"])
            .env("DISPLAY", &display)
            .env("HOME", &home.0)
            .env("XDG_CONFIG_HOME", home.0.join("config"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("tauri-driver (cargo install tauri-driver --version 2.1.0 --locked; cargo xtask test does)")?,
    );
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let capabilities = json!({"capabilities": {"alwaysMatch": {"browserName": "wry", "tauri:options": {"application": console}}}});
    let deadline = Instant::now() + Duration::from_secs(60);
    let session = loop {
        match http.post(format!("{base}/session")).json(&capabilities).send().await {
            Ok(response) => {
                let value: Value = response.json().await?;
                if let Some(id) = value["value"]["sessionId"].as_str() {
                    break id.to_owned();
                }
                anyhow::ensure!(Instant::now() < deadline, "no webdriver session: {value}");
            }
            Err(error) => anyhow::ensure!(Instant::now() < deadline, "tauri-driver did not start: {error}"),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let driver = Driver { http, base, session };

    // A wrong fingerprint is refused; the right one connects.
    driver.fill("url", &server.url).await?;
    driver.fill("fingerprint", &format!("SHA256:{}", "AB:".repeat(31) + "AB")).await?;
    driver.click("connect-button").await?;
    driver.wait_text("connect-error", "does not match").await?;
    assert!(!driver.displayed("login").await?, "no login before the CA is right");
    driver.fill("fingerprint", &fingerprint).await?;
    driver.click("connect-button").await?;
    driver.wait_displayed("login").await?;

    driver.fill("username", "admin").await?;
    driver.fill("password", "wrong-password").await?;
    driver.click("login-button").await?;
    driver.wait_text("login-error", "401").await?;
    driver.fill("password", "console-admin-password").await?;
    driver.click("login-button").await?;
    driver.wait_displayed("dashboard").await?;

    driver.fill("event-name", "Console Cup").await?;
    driver.click("create-event").await?;
    driver.wait_text("events", "Console Cup").await?;
    // A bad row is named with its line; nothing is imported.
    driver.fill("csv", "team,name,email\nRed,Ada,not-an-email\n").await?;
    driver.click("import").await?;
    driver.wait_text("import-errors", "line 2").await?;
    driver.fill("csv", "team,name,email\nRed,Ada,ada@example.org\nBlue,Bob,\n").await?;
    driver.click("import").await?;
    driver.wait_text("import-result", "Imported 2 participant(s), 2 new team(s)").await?;
    // Badges with the join codes, shown this once, as a PDF.
    driver.click("save-badges").await?;
    let saved = driver.wait_text("badges-result", "Saved 2 badge(s) to ").await?;
    let pdf = std::fs::read(saved.trim_start_matches("Saved 2 badge(s) to ").trim())?;
    let pdf_text = String::from_utf8_lossy(&pdf);
    assert!(pdf_text.starts_with("%PDF-1.4") && pdf_text.contains("(Ada) Tj") && pdf_text.contains("(Team Blue) Tj"), "{pdf_text}");
    driver.wait_text("events", "2").await?;

    // A lab host enrols and runs: the console shows it.
    let users = LabUsers::new();
    let (status, token) = admin.post("/api/v1/hosts/enrolment-tokens", json!({})).await?;
    anyhow::ensure!(status == 201, "{token}");
    let state = DataDir::new("console-host");
    let (ok, text) = enrol_host(&server.url, &data.0, token["token"].as_str().context("token")?, "rack-a1", &state.0)?;
    anyhow::ensure!(ok, "{text}");
    let _host = LabHost::start(&state.0, &users.prefix, 3389, 22, &[], &[])?;
    driver.wait_text("hosts", "rack-a1").await?;
    driver.wait_text("hosts", "healthy").await?;

    // No NVIDIA here: the heat map says so instead of drawing cells.
    driver.wait_text("heatmap", "No NVIDIA GPUs").await?;
    // Event control: take the event live, then freeze its board.
    driver.wait_text("focus-state", "draft").await?;
    driver.click("transition-live").await?;
    driver.wait_text("focus-state", "live").await?;
    driver.click("transition-frozen").await?;
    driver.wait_text("focus-state", "frozen").await?;
    driver.wait_text("board", "Red").await?;
    let (_, events) = admin.get("/api/v1/events").await?;
    assert_eq!(events["events"][0]["state"], "frozen", "{events}");
    // An announcement from the console reaches the event's participants.
    driver.fill("announcement", "Doors close at 18:00").await?;
    driver.click("announce").await?;
    driver.wait_text("announcements", "Doors close at 18:00").await?;
    let event_id = events["events"][0]["id"].as_i64().context("event id")?;
    let (_, sent) = admin.get(&format!("/api/v1/events/{event_id}/announcements")).await?;
    assert_eq!(sent[0]["text"], "Doors close at 18:00", "{sent}");

    let shots = std::env::var_os("LABRACK_SCREENSHOT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| labrack_e2e::labrack_bin().parent().and_then(Path::parent).map(|t| t.join("screenshots")).unwrap_or_default());
    driver.screenshot(&shots.join("console-dashboard.png")).await?;
    let _ = driver.http.delete(format!("{}/session/{}", driver.base, driver.session)).send().await;
    Ok(())
}
