//! The Tauri staff console (`labrack-console`) under Xvfb, driven through tauri-driver and
//! WebKitWebDriver against a real `labrack serve`: a wrong CA fingerprint is refused, the
//! right one connects, staff log in, create an event, import a roster, and watch a real
//! `labrack-host` appear, search the roster, watch a real xrdp lab desktop (the lab's own,
//! in its box) on the wall of thumbnails, and hear of a lab host going down as a desktop
//! notification (a real session
//! D-Bus and the dunst notification daemon). A screenshot of the dashboard is saved.

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use labrack_e2e::{
    Api, DataDir, LabHost, LabUsers, Server, client_trusting, enrol_host, free_port,
};
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
        .args([
            "-displayfd",
            "1",
            "-screen",
            "0",
            "1280x800x24",
            "-nolisten",
            "tcp",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("Xvfb (apt xvfb)")?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    Ok((Killed(child), format!(":{}", line.trim())))
}

/// A private session D-Bus with the dunst notification daemon on `display`; returns them
/// and the bus address.
fn notification_daemon(dir: &Path, display: &str) -> anyhow::Result<(Killed, Killed, String)> {
    let socket = dir.join("bus");
    let address = format!("unix:path={}", socket.display());
    let bus = Killed(
        Command::new("dbus-daemon")
            .args([
                "--session",
                "--nofork",
                "--nopidfile",
                &format!("--address={address}"),
            ])
            .stdout(Stdio::null())
            .spawn()
            .context("dbus-daemon (apt dbus)")?,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        anyhow::ensure!(Instant::now() < deadline, "the session bus did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let dunst = Killed(
        Command::new("dunst")
            .env("DISPLAY", display)
            .env("DBUS_SESSION_BUS_ADDRESS", &address)
            .env("HOME", dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("dunst (apt dunst)")?,
    );
    Ok((bus, dunst, address))
}

/// The notifications dunst has shown (closed first: `dunstctl history` lists closed ones).
fn shown_notifications(address: &str) -> String {
    let _ = Command::new("dunstctl")
        .arg("close-all")
        .env("DBUS_SESSION_BUS_ADDRESS", address)
        .status();
    Command::new("dunstctl")
        .arg("history")
        .env("DBUS_SESSION_BUS_ADDRESS", address)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Everything the tray icons on the session bus show: libayatana-appindicator exports each
/// as a StatusNotifierItem under /org/ayatana/NotificationItem, its label a property.
fn tray_items(address: &str) -> String {
    let gdbus = |args: &[&str]| {
        Command::new("gdbus")
            .args(args)
            .env("DBUS_SESSION_BUS_ADDRESS", address)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let names = gdbus(&[
        "call",
        "--session",
        "--dest",
        "org.freedesktop.DBus",
        "--object-path",
        "/org/freedesktop/DBus",
        "--method",
        "org.freedesktop.DBus.ListNames",
    ]);
    names
        .split('\'')
        .filter(|name| name.starts_with(':'))
        .map(|name| {
            gdbus(&[
                "introspect",
                "--session",
                "--dest",
                name,
                "--object-path",
                "/org/ayatana/NotificationItem",
                "--recurse",
            ])
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Answers the console's native (GTK) file dialog titled `title` by typing `path` into it, as
/// staff would at the keyboard (xdotool on the Xvfb display).
async fn answer_file_dialog(display: &str, title: &str, path: &Path) -> anyhow::Result<()> {
    let xdo = |args: &[&str]| {
        Command::new("xdotool")
            .args(args)
            .env("DISPLAY", display)
            .output()
            .context("xdotool (apt xdotool)")
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let window = loop {
        let found = xdo(&["search", "--name", title])?;
        if let Some(id) = String::from_utf8_lossy(&found.stdout).lines().next() {
            break id.to_owned();
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no file dialog titled {title:?} opened"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Let GTK map and focus the dialog's entry before typing.
    tokio::time::sleep(Duration::from_millis(800)).await;
    xdo(&["windowfocus", "--sync", &window])?;
    // A save dialog's name field is focused and pre-filled: select it all, then type over
    // it. In an open dialog, a leading "/" opens the location field.
    xdo(&["key", "--clearmodifiers", "ctrl+a"])?;
    xdo(&["type", "--delay", "40", &path.display().to_string()])?;
    tokio::time::sleep(Duration::from_millis(400)).await;
    xdo(&["key", "Return"])?;
    Ok(())
}

struct Driver {
    http: reqwest::Client,
    base: String,
    session: String,
}

impl Driver {
    async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let response = self
            .http
            .post(format!("{}/session/{}{path}", self.base, self.session))
            .json(&body)
            .send()
            .await?;
        let value: Value = response.json().await?;
        if value["value"]["error"].is_string() {
            anyhow::bail!("webdriver {path}: {}", value["value"]);
        }
        Ok(value["value"].clone())
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let value: Value = self
            .http
            .get(format!("{}/session/{}{path}", self.base, self.session))
            .send()
            .await?
            .json()
            .await?;
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
                Ok(found) if found[ELEMENT].is_string() => {
                    return Ok(found[ELEMENT].as_str().unwrap_or_default().to_owned());
                }
                other if Instant::now() > deadline => {
                    let source = self.get("/source").await.unwrap_or_default();
                    anyhow::bail!(
                        "no element {testid}: {other:?}; the page is {}",
                        source.to_string().chars().take(600).collect::<String>()
                    );
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Types into a field after clearing it; a newline is typed as the Enter key.
    /// WebKitWebDriver now and then answers a key event with an empty "unknown error" while
    /// the page is busy; the field is then cleared and typed again (three tries).
    async fn fill(&self, testid: &str, text: &str) -> anyhow::Result<()> {
        let mut tries = 0;
        loop {
            let id = self.find(testid).await?;
            let typed = async {
                self.post(&format!("/element/{id}/clear"), json!({}))
                    .await?;
                self.post(
                    &format!("/element/{id}/value"),
                    json!({"text": text.replace('\n', "\u{E007}")}),
                )
                .await
            };
            match typed.await {
                Ok(_) => return Ok(()),
                Err(error) if tries < 2 => {
                    tries += 1;
                    eprintln!("typing into {testid} failed ({error}); again");
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    async fn click(&self, testid: &str) -> anyhow::Result<()> {
        let id = self.find(testid).await?;
        self.post(&format!("/element/{id}/click"), json!({}))
            .await?;
        Ok(())
    }

    async fn text(&self, testid: &str) -> anyhow::Result<String> {
        let id = self.find(testid).await?;
        Ok(self
            .get(&format!("/element/{id}/text"))
            .await?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    async fn displayed(&self, testid: &str) -> anyhow::Result<bool> {
        let id = self.find(testid).await?;
        Ok(self
            .get(&format!("/element/{id}/displayed"))
            .await?
            .as_bool()
            .unwrap_or(false))
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
                let source = self
                    .get("/source")
                    .await
                    .unwrap_or_default()
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                let at = source
                    .find(&format!("data-testid=\"{testid}\""))
                    .unwrap_or(0);
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

    /// Runs a script in the page; `arguments[0]` is `arg`.
    async fn execute(&self, script: &str, arg: Value) -> anyhow::Result<Value> {
        self.post("/execute/sync", json!({"script": script, "args": [arg]}))
            .await
    }

    async fn screenshot(&self, path: &Path) -> anyhow::Result<()> {
        use base64::Engine as _;
        let png = self.get("/screenshot").await?;
        let bytes =
            base64::engine::general_purpose::STANDARD.decode(png.as_str().unwrap_or_default())?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, bytes)?;
        Ok(())
    }
}

/// Starts the console (a WebDriver session through tauri-driver); returns the session id.
async fn start_console(
    http: &reqwest::Client,
    base: &str,
    console: &Path,
) -> anyhow::Result<String> {
    let capabilities = json!({"capabilities": {"alwaysMatch": {"browserName": "wry", "tauri:options": {"application": console}}}});
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match http
            .post(format!("{base}/session"))
            .json(&capabilities)
            .send()
            .await
        {
            Ok(response) => {
                let value: Value = response.json().await?;
                if let Some(id) = value["value"]["sessionId"].as_str() {
                    return Ok(id.to_owned());
                }
                anyhow::ensure!(Instant::now() < deadline, "no webdriver session: {value}");
            }
            Err(error) => anyhow::ensure!(
                Instant::now() < deadline,
                "tauri-driver did not start: {error}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Enrols a lab host named `name` and runs it (its labs' desktops are their own xrdp);
/// returns it and its state directory (kept while it runs).
async fn start_host(
    admin: &Api,
    url: &str,
    data: &Path,
    name: &str,
    users: &LabUsers,
    skeletons: &Path,
) -> anyhow::Result<(LabHost, DataDir)> {
    let (status, token) = admin
        .post("/api/v1/hosts/enrolment-tokens", json!({}))
        .await?;
    anyhow::ensure!(status == 201, "{token}");
    let state = DataDir::new(&format!("console-{name}"));
    let (ok, text) = enrol_host(
        url,
        data,
        token["token"].as_str().context("token")?,
        name,
        &state.0,
    )?;
    anyhow::ensure!(ok, "{text}");
    let host = LabHost::start(&state.0, users, skeletons, &[], &[])?;
    Ok((host, state))
}

/// The id of the only event (the console test creates one).
async fn focused_event(admin: &Api) -> anyhow::Result<i64> {
    let (_, events) = admin.get("/api/v1/events").await?;
    events["events"][0]["id"].as_i64().context("event id")
}

#[tokio::test]
async fn the_console_pins_the_ca_logs_in_creates_an_event_imports_a_roster_and_sees_a_host()
-> anyhow::Result<()> {
    let console = console_bin();
    anyhow::ensure!(
        console.exists(),
        "{} is missing: cargo xtask test builds it",
        console.display()
    );
    let data = DataDir::new("console");
    // Hosts beat every second, so a stopped one is marked down within seconds.
    // On every interface, so it announces itself on the LAN (mDNS) for the console to find.
    // A fixed port: the appliance restarts mid-test where the console knows it.
    let listen = format!("0.0.0.0:{}", free_port()?);
    let server = Server::start_with(&data.0, &listen, &["--host-heartbeat-secs", "1"])?;
    let mut admin = Api {
        client: client_trusting(&data.0)?,
        base: server.url.clone(),
        token: None,
    };
    admin
        .first_admin_login(
            server.admin_password.as_deref().context("otp")?,
            "console-admin-password",
        )
        .await?;
    let fingerprint = server.ca_fingerprint.clone().context("fingerprint")?;

    let (_xvfb, display) = xvfb()?;
    let port = free_port()?;
    let native = free_port()?;
    let home = DataDir::new("console-home");
    let (_bus, _dunst, bus_address) = notification_daemon(&home.0, &display)?;
    let _driver = Killed(
        Command::new("tauri-driver")
            .args(["--port", &port.to_string(), "--native-port", &native.to_string(), "--native-driver", "/usr/bin/WebKitWebDriver"])
            .env("DISPLAY", &display)
            .env("HOME", &home.0)
            .env("XDG_CONFIG_HOME", home.0.join("config"))
            .env("DBUS_SESSION_BUS_ADDRESS", &bus_address)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("tauri-driver (cargo install tauri-driver --version 2.1.0 --locked; cargo xtask test does)")?,
    );
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let session = start_console(&http, &base, &console).await?;
    let driver = Driver {
        http,
        base,
        session,
    };

    // The console finds the appliance on the LAN: its certificate's host name and port,
    // reached at the announced address.
    let port = reqwest::Url::parse(&server.url)?.port().context("port")?;
    driver.click("discover").await?;
    driver
        .wait_text("discovered", &format!(":{port} at "))
        .await?;
    driver.click(&format!("use-{port}")).await?;
    let machine = std::fs::read_to_string("/etc/hostname")?.trim().to_owned();
    let url = driver
        .execute(
            "return document.querySelector('[data-testid=\"url\"]').value",
            json!(null),
        )
        .await?;
    assert_eq!(url, format!("https://{machine}:{port}"));
    // A wrong fingerprint is refused; the right one connects.
    driver
        .fill(
            "fingerprint",
            &format!("SHA256:{}", "AB:".repeat(31) + "AB"),
        )
        .await?;
    driver.click("connect-button").await?;
    driver.wait_text("connect-error", "does not match").await?;
    assert!(
        !driver.displayed("login").await?,
        "no login before the CA is right"
    );
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

    // The appliance's problem document reaches the screen whole: its detail is shown and
    // the field it names is marked, as the web UI does.
    driver.fill("event-name", "   ").await?;
    driver.click("create-event").await?;
    driver.wait_text("event-error", "422").await?;
    let marked = driver
        .execute(
            "return document.querySelector('[data-testid=\"event-name\"]').getAttribute('aria-invalid');",
            json!(null),
        )
        .await?;
    assert_eq!(
        marked,
        json!("true"),
        "the name field is marked as at fault"
    );
    driver.fill("event-name", "Console Cup").await?;
    driver.click("create-event").await?;
    driver.wait_text("events", "Console Cup").await?;
    let marked = driver
        .execute(
            "return document.querySelector('[data-testid=\"event-name\"]').getAttribute('aria-invalid');",
            json!(null),
        )
        .await?;
    assert_eq!(marked, json!(null), "the mark goes once the event is made");
    // A bad row is named with its line; nothing is imported.
    driver
        .fill("csv", "team,name,email\nRed,Ada,not-an-email\n")
        .await?;
    driver.click("import").await?;
    driver.wait_text("import-errors", "line 2").await?;
    // The good roster comes from a file picked in the native open dialog.
    let roster = home.0.join("roster.csv");
    std::fs::write(
        &roster,
        "team,name,email\nRed,Ada,ada@example.org\nBlue,Bob,\n",
    )?;
    driver.click("pick-roster").await?;
    answer_file_dialog(&display, "Choose a roster CSV", &roster).await?;
    driver
        .wait_text("import-result", "Loaded 2 row(s) from the file")
        .await?;
    driver.click("import").await?;
    driver
        .wait_text("import-result", "Imported 2 participant(s), 2 new team(s)")
        .await?;
    // Badges with the join codes, shown this once, as a PDF saved where staff choose.
    driver.click("save-badges").await?;
    let badges_pdf = home.0.join("badges.pdf");
    answer_file_dialog(&display, "Save join-code badges", &badges_pdf).await?;
    let saved = driver
        .wait_text("badges-result", "Saved 2 badge(s) to ")
        .await?;
    assert_eq!(
        saved.trim_start_matches("Saved 2 badge(s) to ").trim(),
        badges_pdf.display().to_string()
    );
    let pdf = std::fs::read(&badges_pdf)?;
    assert!(pdf.starts_with(b"%PDF-"), "a PDF was saved");
    // Read back as text by poppler, as a person's PDF viewer would.
    let extracted = std::process::Command::new("pdftotext")
        .arg(&badges_pdf)
        .arg("-")
        .output()?;
    let pdf_text = String::from_utf8_lossy(&extracted.stdout);
    assert!(
        extracted.status.success() && pdf_text.contains("Ada") && pdf_text.contains("Team Blue"),
        "{pdf_text}"
    );
    driver.wait_text("events", "2").await?;

    // Search finds participants by name, e-mail or team.
    driver.wait_text("people-count", "2 of 2").await?;
    driver.fill("people-search", "bob").await?;
    driver.wait_text("people-count", "1 of 2").await?;
    let found = driver.text("people").await?;
    assert!(
        found.contains("Bob") && found.contains("Blue") && !found.contains("Ada"),
        "{found}"
    );
    driver.fill("people-search", "ada@example").await?;
    driver.wait_text("people", "Ada").await?;
    driver.wait_text("summary-people", "0/2 joined").await?;

    // A lab host enrols and runs a real xrdp desktop: the console shows the host, then the
    // lab on its wall of view-only thumbnails.
    let users = LabUsers::new();
    let skeleton = DataDir::new("console-skel");
    std::fs::write(
        skeleton.0.join(".xsession"),
        "xsetroot -solid '#1e90ff'\nexec xterm -geometry 40x10+20+20\n",
    )?;
    let templates = format!(
        "[[template]]\nname = \"desk\"\nruntime = \"local-user\"\nskeleton = \"{}\"\n",
        skeleton.0.display()
    );
    let (status, body) = admin.put_toml("/api/v1/templates", &templates).await?;
    anyhow::ensure!(status == 200, "{body}");
    let (host, _state) =
        start_host(&admin, &server.url, &data.0, "rack-a1", &users, &skeleton.0).await?;
    driver.wait_text("hosts", "rack-a1").await?;
    driver.wait_text("hosts", "healthy").await?;
    let (_, teams) = admin
        .get(&format!(
            "/api/v1/events/{}/teams",
            focused_event(&admin).await?
        ))
        .await?;
    let red = teams["teams"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["name"] == "Red"))
        .context("team Red")?["id"]
        .as_i64()
        .context("id")?;
    let (status, lab) = admin
        .post(
            &format!("/api/v1/teams/{red}/allocation"),
            json!({"template": "desk"}),
        )
        .await?;
    anyhow::ensure!(status == 201, "{lab}");
    let lab_id = lab["id"].as_i64().context("allocation")?;
    admin
        .wait_for(
            &format!("/api/v1/allocations/{lab_id}"),
            Duration::from_secs(120),
            |a| a["state"] == "active" && a["busy"] == false,
        )
        .await?;
    driver.wait_text("summary-labs", "1 active").await?;
    driver.wait_text("desktop-wall", "Red · rack-a1").await?;
    // The tile shows the lab's own desktop: its background colour, sampled in the page.
    let sample = r#"const img = document.querySelector('[data-testid="desktop-thumb"][data-team="' + arguments[0] + '"]');
        if (!img || !img.complete || !img.naturalWidth) return null;
        const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
        const g = c.getContext('2d'); g.drawImage(img, 0, 0);
        return Array.from(g.getImageData(Math.floor(c.width * 0.95), Math.floor(c.height / 2), 1, 1).data.slice(0, 3));"#;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rgb = driver.execute(sample, json!("Red")).await?;
        let close = rgb.as_array().is_some_and(|c| {
            c.len() == 3
                && c.iter()
                    .zip([0x1e, 0x90, 0xff])
                    .all(|(got, want)| got.as_i64().is_some_and(|g| (g - want).abs() < 24))
        });
        if close {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the wall never showed Red's desktop (last sample {rgb})"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // No NVIDIA here: the heat map says so instead of drawing cells.
    driver.wait_text("heatmap", "No NVIDIA GPUs").await?;
    // Event control: take the event live, then freeze its board.
    driver.wait_text("focus-state", "draft").await?;
    driver.click("transition-live").await?;
    driver.wait_text("focus-state", "live").await?;
    driver.click("transition-frozen").await?;
    driver.wait_text("focus-state", "frozen").await?;
    // The tray icon's label follows the event's state.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !tray_items(&bus_address).contains("Console Cup: frozen") {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the tray never showed the frozen event: {}",
            tray_items(&bus_address)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    driver.wait_text("board", "Red").await?;
    let (_, events) = admin.get("/api/v1/events").await?;
    assert_eq!(events["events"][0]["state"], "frozen", "{events}");
    // An announcement from the console reaches the event's participants.
    driver.fill("announcement", "Doors close at 18:00").await?;
    driver.click("announce").await?;
    driver
        .wait_text("announcements", "Doors close at 18:00")
        .await?;
    let event_id = events["events"][0]["id"].as_i64().context("event id")?;
    let (_, sent) = admin
        .get(&format!("/api/v1/events/{event_id}/announcements"))
        .await?;
    assert_eq!(sent[0]["text"], "Doors close at 18:00", "{sent}");
    // The billing ledger exports through a native save dialog, byte for byte what the API serves.
    let (status, body) = admin
        .post(
            &format!("/api/v1/events/{event_id}/ledger"),
            json!({"kind": "credit", "amount_cents": 1250, "note": "projector hire"}),
        )
        .await?;
    anyhow::ensure!(status == 201, "{body}");
    driver.click("export-ledger").await?;
    let ledger = home.0.join("ledger.csv");
    answer_file_dialog(&display, "Export the billing ledger", &ledger).await?;
    driver
        .wait_text("export-result", "Saved the ledger to")
        .await?;
    let (_, _, served) = admin
        .get_bytes(&format!("/api/v1/events/{event_id}/ledger.csv"))
        .await?;
    let exported = std::fs::read(&ledger)?;
    assert!(
        String::from_utf8_lossy(&exported).contains("projector hire"),
        "{}",
        String::from_utf8_lossy(&exported)
    );
    assert_eq!(exported, served);

    let shots = std::env::var_os("LABRACK_SCREENSHOT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            labrack_e2e::labrack_bin()
                .parent()
                .and_then(Path::parent)
                .map(|t| t.join("screenshots"))
                .unwrap_or_default()
        });
    let show = "document.querySelector('[data-testid=\"' + arguments[0] + '\"]').scrollIntoView({block: 'start'}); return null;";
    driver.execute(show, json!("event-card")).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    driver
        .screenshot(&shots.join("console-dashboard.png"))
        .await?;
    driver.execute(show, json!("desktop-wall")).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    driver.screenshot(&shots.join("console-wall.png")).await?;

    // The lab host stops: the dashboard names the problem and a desktop notification says so.
    drop(host);
    driver
        .wait_text("problems", "rack-a1 stopped answering")
        .await?;
    driver.wait_text("notify-state", "Notified").await?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while !shown_notifications(&bus_address).contains("Lab host down") {
        anyhow::ensure!(
            Instant::now() < deadline,
            "dunst never showed the notification: {}",
            shown_notifications(&bus_address)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Staff move Red's lab off the dead host: a fresh lab from the same template elsewhere.
    let (host_b, _state_b) =
        start_host(&admin, &server.url, &data.0, "rack-b", &users, &skeleton.0).await?;
    driver.wait_text("hosts", "rack-b").await?;
    driver.click("lab-reassign").await?;
    driver
        .wait_text("labs", "Confirm: move Red's lab to another host")
        .await?;
    driver.click("lab-reassign").await?;
    if let Err(error) = driver.wait_text("labs", "rack-b").await {
        anyhow::bail!(
            "{error}; the event card says {:?}",
            driver.text("focus-error").await.unwrap_or_default()
        );
    }
    let (_, labs) = admin
        .get(&format!("/api/v1/events/{event_id}/allocations"))
        .await?;
    let states: Vec<(String, String)> = labs["allocations"]
        .as_array()
        .context("allocations")?
        .iter()
        .map(|a| {
            (
                a["host_name"].as_str().unwrap_or_default().to_owned(),
                a["state"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert!(
        states.contains(&("rack-a1".into(), "released".into()))
            && states
                .iter()
                .any(|(host, state)| host == "rack-b" && state != "released"),
        "{states:?}"
    );
    drop(host_b);

    // The link drops (the appliance stops, as when a laptop loses Wi-Fi): the console says so
    // and keeps trying, then carries on with the same session once the appliance is back.
    let status = server.terminate()?;
    anyhow::ensure!(status.success(), "labrack exited with {status}");
    driver
        .wait_text("link-state", "Appliance unreachable")
        .await?;
    let _server = Server::start_with(&data.0, &listen, &["--host-heartbeat-secs", "1"])?;
    driver.wait_text("link-state", "Connected").await?;
    driver.wait_text("events", "Console Cup").await?;

    // Started again, the console remembers the appliance with its pinned CA and address.
    driver
        .http
        .delete(format!("{}/session/{}", driver.base, driver.session))
        .send()
        .await?;
    let session = start_console(&driver.http, &driver.base, &console).await?;
    let driver = Driver { session, ..driver };
    driver
        .wait_text("remembered", &format!("https://{machine}:{port}"))
        .await?;
    driver.click("use-remembered").await?;
    driver.click("connect-button").await?;
    driver.wait_displayed("login").await?;
    let _ = driver
        .http
        .delete(format!("{}/session/{}", driver.base, driver.session))
        .send()
        .await;
    Ok(())
}
