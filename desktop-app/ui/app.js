// The console's screens: connect (URL + pinned CA fingerprint), log in, then the event
// dashboard. Every API call goes through the Rust side (`invoke`), which holds the pinned
// TLS client and the session token; nothing here sees either.

const invoke = window.__TAURI__.core.invoke;
const $ = (id) => document.getElementById(id);

function show(screen) {
  for (const id of ["connect", "login", "dashboard"]) $(id).hidden = id !== screen;
}

function text(el, value) {
  el.textContent = value ?? "";
}

// A failed call in words: the appliance's problem document (its status, detail and the
// bad rows of an upload, one per line) or the console's own sentence.
function describe(err) {
  if (err && typeof err === "object" && typeof err.detail === "string") {
    const rows = (err.errors ?? []).map((row) => `\nline ${row.line}: ${row.reason}`).join("");
    return `${err.status}: ${err.detail}${rows}`;
  }
  return String(err);
}

// Shows a failure in `box` and marks the input the appliance named as at fault (the
// problem document's `field`, looked up in `inputs`), clearing earlier marks.
function showFailure(box, err, inputs = {}) {
  text(box, describe(err));
  for (const input of Object.values(inputs)) {
    input.classList.remove("invalid");
    input.removeAttribute("aria-invalid");
  }
  const bad = err && typeof err === "object" ? inputs[err.field] : undefined;
  if (bad) {
    bad.classList.add("invalid");
    bad.setAttribute("aria-invalid", "true");
    bad.focus();
  }
}

async function call(method, path, body) {
  return invoke("api", { method, path, body: body ?? null, csv: null });
}

async function renderRemembered() {
  const list = $("remembered");
  list.replaceChildren();
  for (const appliance of await invoke("remembered")) {
    const item = document.createElement("li");
    const use = document.createElement("button");
    use.textContent = `Use ${appliance.url}`;
    use.dataset.testid = "use-remembered";
    use.addEventListener("click", () => {
      $("url").value = appliance.url;
      $("fingerprint").value = appliance.fingerprint;
      chosenAddress = appliance.address ?? null;
    });
    item.append(use);
    list.append(item);
  }
}

// Where a discovered appliance's host name is reached (IP:PORT), until the URL is edited.
let chosenAddress = null;
$("url").addEventListener("input", () => {
  chosenAddress = null;
});

$("discover").addEventListener("click", async () => {
  const list = $("discovered");
  list.replaceChildren();
  text($("discover-state"), "Looking for appliances on this network…");
  try {
    const found = await invoke("discover");
    text($("discover-state"), found.length ? `Found ${found.length}. The fingerprint is not taken from the network: check it on the appliance's screen.` : "No appliance answered on this network. Enter its URL instead.");
    for (const appliance of found) {
      const address = appliance.addresses.find((a) => !a.includes(":") && !a.startsWith("127.")) ?? appliance.addresses[0];
      if (!address) continue;
      const item = document.createElement("li");
      const hint = appliance.fingerprint_hint ? ` · announces ${appliance.fingerprint_hint.slice(0, 30)}…` : "";
      item.textContent = `${appliance.instance} · ${appliance.host}:${appliance.port} at ${address}${hint} `;
      const use = document.createElement("button");
      use.className = "secondary";
      use.dataset.testid = `use-${appliance.port}`;
      use.textContent = "Use";
      use.addEventListener("click", () => {
        $("url").value = `https://${appliance.host}:${appliance.port}`;
        chosenAddress = address.includes(":") ? `[${address}]:${appliance.port}` : `${address}:${appliance.port}`;
        $("fingerprint").focus();
      });
      item.append(use);
      list.append(item);
    }
  } catch (err) {
    text($("discover-state"), describe(err));
  }
});

$("connect-button").addEventListener("click", async () => {
  text($("connect-error"), "");
  try {
    const base = await invoke("connect", { url: $("url").value, fingerprint: $("fingerprint").value, address: chosenAddress });
    text($("where"), `· ${base}`);
    show("login");
    $("username").focus();
  } catch (err) {
    text($("connect-error"), describe(err));
  }
});

$("login-button").addEventListener("click", async () => {
  text($("login-error"), "");
  try {
    const principal = await invoke("login", { username: $("username").value, password: $("password").value });
    if (principal.must_change_password) {
      text($("login-error"), "This account must choose a new password first: do that in the browser UI, then log in here.");
      return;
    }
    text($("where"), `${$("where").textContent} · ${principal.username} (${principal.role})`);
    show("dashboard");
    await refresh();
  } catch (err) {
    text($("login-error"), describe(err));
  }
});

function cell(value, testid) {
  const td = document.createElement("td");
  td.textContent = value;
  if (testid) td.dataset.testid = testid;
  return td;
}

// The last import's join codes (shown once by the appliance), for the badges.
let lastImport = null;
const eventsById = new Map();

async function refreshEvents() {
  const { events } = await call("GET", "/api/v1/events");
  for (const ev of events) eventsById.set(String(ev.id), ev);
  const body = $("events");
  const select = $("import-event");
  const focus = $("focus-event");
  const chosen = select.value;
  const focused = focus.value;
  body.replaceChildren();
  select.replaceChildren();
  focus.replaceChildren();
  for (const ev of events) {
    const row = document.createElement("tr");
    row.dataset.testid = "event-row";
    row.append(cell(ev.name, "event-name-cell"), cell(ev.state), cell(ev.code), cell(String(ev.team_count)), cell(String(ev.participant_count), "event-people"));
    body.append(row);
    const option = document.createElement("option");
    option.value = String(ev.id);
    option.textContent = ev.name;
    select.append(option);
    focus.append(option.cloneNode(true));
  }
  if (chosen) select.value = chosen;
  if (focused) focus.value = focused;
}

// Lab hosts' health by name (a lab on a dead host may be moved to another).
const hostHealthy = new Map();

async function refreshHosts() {
  const { hosts } = await call("GET", "/api/v1/hosts");
  for (const host of hosts) hostHealthy.set(host.name, host.healthy);
  renderHeatmap(hosts);
  const body = $("hosts");
  body.replaceChildren();
  for (const host of hosts) {
    const row = document.createElement("tr");
    row.dataset.testid = "host-row";
    const health = cell(host.healthy ? "healthy" : "unhealthy");
    health.className = host.healthy ? "healthy" : "unhealthy";
    const cpu = host.telemetry ? `${Math.round(host.telemetry.cpu_percent)} %` : "—";
    const gpus = host.telemetry?.gpus?.status === "present" ? host.telemetry.gpus.devices.map((d) => `${d.utilization_percent ?? "?"} % · ${d.temperature_celsius ?? "?"} °C`).join(", ") : "none";
    row.append(cell(host.name, "host-name"), health, cell(`${host.labs_in_use}/${host.capacity}`), cell(cpu), cell(gpus));
    body.append(row);
  }
}

// Legal moves from each event state (the appliance refuses the rest).
// Words on the transition buttons; which moves are legal comes from the event's next_states.
const MOVE_LABELS = { live: "Go live", frozen: "Freeze board", ended: "End event", archived: "Archive" };

function moveLabel(from, to) {
  if (from === "frozen" && to === "live") return "Unfreeze";
  return MOVE_LABELS[to] ?? to;
}

function heatColour(utilization, temperature) {
  // Blue when idle, through orange, to red when busy or hot.
  const load = Math.max(utilization ?? 0, temperature === null || temperature === undefined ? 0 : Math.min(100, (temperature - 30) * 2));
  const hue = 220 - Math.round(load * 2.2);
  return `hsl(${hue}, 70%, 45%)`;
}

function renderHeatmap(hosts) {
  const map = $("heatmap");
  map.replaceChildren();
  let cells = 0;
  for (const host of hosts) {
    const gpus = host.telemetry?.gpus;
    if (gpus?.status !== "present") continue;
    for (const gpu of gpus.devices) {
      const cell = document.createElement("div");
      cell.className = "heat";
      cell.dataset.testid = "heat-cell";
      cell.style.background = heatColour(gpu.utilization_percent, gpu.temperature_celsius);
      cell.textContent = `${host.name} #${gpu.index}: ${gpu.utilization_percent ?? "?"} % · ${gpu.temperature_celsius ?? "?"} °C`;
      map.append(cell);
      cells += 1;
    }
  }
  if (!cells) {
    const none = document.createElement("p");
    none.className = "muted";
    none.dataset.testid = "no-gpus";
    none.textContent = hosts.length ? "No NVIDIA GPUs reported by the lab hosts." : "No lab hosts yet.";
    map.append(none);
  }
}

async function refreshFocus() {
  const select = $("focus-event");
  const eventId = select.value;
  if (!eventId) return;
  const [event, board, labs, news, summary, people] = await Promise.all([
    call("GET", `/api/v1/events/${eventId}`),
    call("GET", `/api/v1/events/${eventId}/leaderboard`),
    call("GET", `/api/v1/events/${eventId}/allocations`),
    call("GET", `/api/v1/events/${eventId}/announcements`),
    call("GET", `/api/v1/events/${eventId}/dashboard`),
    call("GET", `/api/v1/events/${eventId}/participants`),
  ]);
  renderSummary(summary);
  everyone = people.participants;
  renderPeople();
  renderWall(labs.allocations.filter((lab) => lab.state === "active"));
  const list = $("announcements");
  list.replaceChildren();
  for (const item of news) {
    const li = document.createElement("li");
    li.dataset.testid = "sent-announcement";
    li.textContent = `${new Date(item.at).toLocaleTimeString()} · ${item.text}`;
    list.append(li);
  }
  text($("focus-state"), `State: ${event.state}`);
  $("focus-state").dataset.state = event.state;
  const moves = $("transitions");
  moves.replaceChildren();
  for (const to of event.next_states ?? []) {
    const button = document.createElement("button");
    button.className = "transition";
    button.dataset.testid = `transition-${to}`;
    button.textContent = moveLabel(event.state, to);
    button.addEventListener("click", async () => {
      text($("focus-error"), "");
      try {
        await call("POST", `/api/v1/events/${eventId}/transition`, { to, from: event.state });
        await refreshFocus();
      } catch (err) {
        text($("focus-error"), describe(err));
      }
    });
    moves.append(button);
  }
  const rows = $("board");
  rows.replaceChildren();
  for (const row of board.rows) {
    const tr = document.createElement("tr");
    tr.dataset.testid = "board-row";
    tr.append(cell(String(row.rank)), cell(row.team, "board-team"), cell(String(row.total)));
    rows.append(tr);
  }
  const labRows = $("labs");
  // Do not pull a confirmation away from under the pointer.
  if (labRows.querySelector('[data-armed="yes"]')) return;
  labRows.replaceChildren();
  for (const lab of labs.allocations) {
    const tr = document.createElement("tr");
    tr.dataset.testid = "lab-row";
    const actions = document.createElement("td");
    const stranded = lab.state === "failed" || lab.state === "release_failed" || lab.state === "unreachable" || hostHealthy.get(lab.host_name) === false;
    for (const [action, label] of [["reset", "Reset"], ["resume", "Resume"], ["reassign", "Move to another host"], ["force-release", "Force release"]]) {
      if (lab.state !== "active" && action === "reset") continue;
      if (action === "resume" && !lab.resumable) continue;
      if (action === "reassign" && !stranded) continue;
      if (lab.state === "released") continue;
      const button = document.createElement("button");
      button.className = "secondary";
      button.dataset.testid = `lab-${action}`;
      button.textContent = label;
      button.addEventListener("click", async () => {
        // Two clicks: the first asks, the second acts (no native dialogs needed).
        if (button.dataset.armed !== "yes") {
          button.dataset.armed = "yes";
          button.textContent = action === "reassign" ? `Confirm: move ${lab.team_name}'s lab to another host` : `Confirm: ${label.toLowerCase()} ${lab.team_name}'s lab`;
          return;
        }
        // Acted (or refused): the confirmation is spent, so the table may redraw again.
        button.dataset.armed = "no";
        text($("focus-error"), "");
        try {
          await call("POST", `/api/v1/allocations/${lab.id}/${action}`, {});
          await refreshFocus();
        } catch (err) {
          text($("focus-error"), describe(err));
        }
      });
      actions.append(button);
    }
    tr.append(cell(lab.team_name), cell(lab.template), cell(lab.host_name), cell(lab.state), actions);
    labRows.append(tr);
  }
}

function duration(seconds) {
  const h = Math.floor(seconds / 3600);
  const m = Math.floor((seconds % 3600) / 60);
  const sec = seconds % 60;
  return `${h}:${String(m).padStart(2, "0")}:${String(sec).padStart(2, "0")}`;
}

// The tray shows the selected event's state; the last text sent, to send only changes.
let trayText = "";

function setTray(value) {
  if (value === trayText) return;
  trayText = value;
  invoke("set_tray", { text: value }).catch(() => {});
}

// Problems already notified (by key), so a condition raises one notification, not one a poll.
const notified = new Set();

function renderSummary(summary) {
  const clock = summary.clock;
  const when = clock.phase === "before_start" ? `starts in ${duration(clock.seconds_left)}` : clock.phase === "running" ? `${duration(clock.seconds_left)} left` : "past its end time";
  text($("summary-clock"), when);
  setTray(`${summary.name}: ${summary.state} · ${when}${summary.problems.length ? ` · ${summary.problems.length} problem(s)` : ""}`);
  const p = summary.people;
  text($("summary-people"), `${p.signed_in} signed in · ${p.joined}/${p.participants} joined · ${p.teams} teams`);
  const labs = Object.entries(summary.labs).map(([state, n]) => `${n} ${state}`);
  text($("summary-labs"), labs.length ? labs.join(" · ") : "none yet");
  const q = summary.queue;
  text($("summary-queue"), `${q.queued} queued · ${q.running} running · ${q.dead} dead`);
  const sync = summary.sync;
  text($("summary-sync"), sync.state === "off" ? "no cloud link configured" : `${sync.state} · ${sync.pending_rows} rows waiting${sync.pending_age_ms ? ` (oldest ${Math.round(sync.pending_age_ms / 1000)} s)` : ""}`);
  const problems = $("problems");
  problems.replaceChildren();
  for (const problem of summary.problems) {
    const li = document.createElement("li");
    li.dataset.testid = "problem";
    li.dataset.kind = problem.kind;
    li.textContent = problem.detail;
    problems.append(li);
    if (!notified.has(problem.key)) {
      notified.add(problem.key);
      const titles = { host_down: "Lab host down", dead_letters: "Jobs failed for good", sync_stalled: "Cloud sync stalled" };
      invoke("notify", { title: `LabRack · ${titles[problem.kind] ?? problem.kind}`, body: problem.detail })
        .then(() => text($("notify-state"), `Notified: ${problem.detail}`))
        .catch((err) => text($("notify-state"), describe(err)));
    }
  }
  const alerts = $("alerts");
  alerts.replaceChildren();
  for (const alert of summary.alerts) {
    const li = document.createElement("li");
    li.dataset.testid = "alert";
    li.textContent = `${new Date(alert.at).toLocaleTimeString()} · ${alert.kind}: ${alert.detail}`;
    alerts.append(li);
  }
  if (!summary.alerts.length) {
    const li = document.createElement("li");
    li.className = "muted";
    li.textContent = "No alerts.";
    alerts.append(li);
  }
}

// The wall: one tile per active lab, each fetching its own picture (one request in flight
// per tile, so a slow desktop does not hold the others back).
const tiles = new Map();

function renderWall(active) {
  const wall = $("wall");
  const ids = new Set(active.map((lab) => lab.id));
  for (const [id, tile] of tiles) {
    if (!ids.has(id)) {
      tile.figure.remove();
      tiles.delete(id);
    }
  }
  for (const lab of active) {
    let tile = tiles.get(lab.id);
    if (!tile) {
      const figure = document.createElement("figure");
      figure.dataset.testid = "desktop-tile";
      const img = document.createElement("img");
      img.alt = `${lab.team_name}'s desktop`;
      img.dataset.testid = "desktop-thumb";
      img.dataset.team = lab.team_name;
      const caption = document.createElement("figcaption");
      figure.append(img, caption);
      wall.append(figure);
      tile = { figure, img, caption, loading: false, lab };
      tiles.set(lab.id, tile);
    }
    tile.lab = lab;
    if (!tile.loading) void loadThumbnail(tile);
  }
  if (!active.length && !wall.querySelector(".muted")) {
    const none = document.createElement("p");
    none.className = "muted";
    none.textContent = "No active labs in this event.";
    wall.append(none);
  } else if (active.length) {
    wall.querySelector(".muted")?.remove();
  }
}

async function loadThumbnail(tile) {
  tile.loading = true;
  try {
    tile.img.src = await invoke("thumbnail", { allocationId: tile.lab.id });
    tile.caption.textContent = `${tile.lab.team_name} · ${tile.lab.host_name}`;
  } catch (err) {
    tile.caption.replaceChildren(`${tile.lab.team_name} · `, Object.assign(document.createElement("span"), { className: "stale", textContent: describe(err) }));
  } finally {
    tile.loading = false;
  }
}

// Search over the selected event's participants (name, e-mail, team).
let everyone = [];

function renderPeople() {
  const query = $("people-search").value.trim().toLowerCase();
  const found = everyone.filter((p) => !query || [p.name, p.email ?? "", p.team_name].some((field) => field.toLowerCase().includes(query)));
  const body = $("people");
  body.replaceChildren();
  for (const person of found.slice(0, 200)) {
    const row = document.createElement("tr");
    row.dataset.testid = "person-row";
    row.append(cell(person.name, "person-name"), cell(person.team_name), cell(person.email ?? ""), cell(person.joined_at ? new Date(person.joined_at).toLocaleTimeString() : "not yet"));
    body.append(row);
  }
  text($("people-count"), `${found.length} of ${everyone.length} participant(s)${found.length > 200 ? "; showing the first 200" : ""}`);
}

$("people-search").addEventListener("input", renderPeople);

async function refresh() {
  try {
    await Promise.all([refreshEvents(), refreshHosts()]);
    await refreshFocus();
    text($("link-state"), `Connected · updated ${new Date().toLocaleTimeString()}`);
  } catch (err) {
    // A laptop that lost Wi-Fi: say so and keep trying.
    text($("link-state"), `Appliance unreachable (${err}); retrying…`);
    setTray("appliance unreachable; retrying");
  }
}

$("create-event").addEventListener("click", async () => {
  const inputs = { name: $("event-name"), starts_at: $("event-starts"), ends_at: $("event-ends") };
  showFailure($("event-error"), "", inputs);
  try {
    await call("POST", "/api/v1/events", { name: inputs.name.value, starts_at: inputs.starts_at.value, ends_at: inputs.ends_at.value });
    inputs.name.value = "";
    await refreshEvents();
  } catch (err) {
    showFailure($("event-error"), err, inputs);
  }
});

$("import").addEventListener("click", async () => {
  text($("import-result"), "");
  $("import-errors").replaceChildren();
  const eventId = $("import-event").value;
  try {
    const result = await invoke("api", { method: "POST", path: `/api/v1/events/${eventId}/participants/import`, body: null, csv: $("csv").value });
    text($("import-result"), `Imported ${result.imported} participant(s), ${result.teams_created} new team(s).`);
    lastImport = { event: eventsById.get(String(eventId)), participants: result.participants };
    $("save-badges").hidden = false;
    text($("badges-result"), "");
    await refreshEvents();
  } catch (err) {
    const [summary, ...rows] = describe(err).split("\n");
    text($("import-result"), summary);
    for (const row of rows) {
      const item = document.createElement("li");
      item.dataset.testid = "import-error";
      item.textContent = row;
      $("import-errors").append(item);
    }
  }
});

setInterval(() => {
  if (!$("dashboard").hidden) void refresh();
}, 2000);

void renderRemembered();

$("focus-event").addEventListener("change", () => void refreshFocus().catch((err) => text($("focus-error"), describe(err))));

$("announce").addEventListener("click", async () => {
  text($("focus-error"), "");
  try {
    await call("POST", `/api/v1/events/${$("focus-event").value}/announcements`, { text: $("announcement").value });
    $("announcement").value = "";
    await refreshFocus();
  } catch (err) {
    text($("focus-error"), describe(err));
  }
});

$("save-badges").addEventListener("click", async () => {
  if (!lastImport) return;
  try {
    const badges = lastImport.participants.map((p) => ({ name: p.participant.name, team: p.participant.team_name, join_code: p.join_code }));
    const path = await invoke("save_badges", { event: lastImport.event?.name ?? "", eventCode: lastImport.event?.code ?? "", badges });
    text($("badges-result"), path ? `Saved ${badges.length} badge(s) to ${path}` : "Not saved (cancelled).");
  } catch (err) {
    text($("badges-result"), describe(err));
  }
});

$("pick-roster").addEventListener("click", async () => {
  text($("import-result"), "");
  try {
    const csv = await invoke("pick_roster");
    if (csv === null) return;
    $("csv").value = csv;
    const rows = csv.split("\n").filter((line) => line.trim()).length - 1;
    text($("import-result"), `Loaded ${rows} row(s) from the file: check them, then Import.`);
  } catch (err) {
    text($("import-result"), describe(err));
  }
});

$("export-ledger").addEventListener("click", async () => {
  text($("export-result"), "");
  const eventId = $("focus-event").value;
  if (!eventId) return;
  try {
    const csv = await call("GET", `/api/v1/events/${eventId}/ledger.csv`);
    const code = eventsById.get(String(eventId))?.code ?? eventId;
    const path = await invoke("save_text", { title: "Export the billing ledger", fileName: `ledger-${code}.csv`, text: String(csv) });
    text($("export-result"), path ? `Saved the ledger to ${path}` : "Not saved (cancelled).");
  } catch (err) {
    text($("export-result"), describe(err));
  }
});
