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
    use.addEventListener("click", () => {
      $("url").value = appliance.url;
      $("fingerprint").value = appliance.fingerprint;
    });
    item.append(use);
    list.append(item);
  }
}

$("connect-button").addEventListener("click", async () => {
  text($("connect-error"), "");
  try {
    const base = await invoke("connect", { url: $("url").value, fingerprint: $("fingerprint").value });
    text($("where"), `· ${base}`);
    show("login");
    $("username").focus();
  } catch (err) {
    text($("connect-error"), String(err));
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
    text($("login-error"), String(err));
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

async function refreshHosts() {
  const { hosts } = await call("GET", "/api/v1/hosts");
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
const MOVES = { draft: [["live", "Go live"]], live: [["frozen", "Freeze board"], ["ended", "End event"]], frozen: [["live", "Unfreeze"], ["ended", "End event"]], ended: [["archived", "Archive"]], archived: [] };

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
  const [event, board, labs, news] = await Promise.all([
    call("GET", `/api/v1/events/${eventId}`),
    call("GET", `/api/v1/events/${eventId}/leaderboard`),
    call("GET", `/api/v1/events/${eventId}/allocations`),
    call("GET", `/api/v1/events/${eventId}/announcements`),
  ]);
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
  for (const [to, label] of MOVES[event.state] ?? []) {
    const button = document.createElement("button");
    button.className = "transition";
    button.dataset.testid = `transition-${to}`;
    button.textContent = label;
    button.addEventListener("click", async () => {
      text($("focus-error"), "");
      try {
        await call("POST", `/api/v1/events/${eventId}/transition`, { to, from: event.state });
        await refreshFocus();
      } catch (err) {
        text($("focus-error"), String(err));
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
    for (const [action, label] of [["reset", "Reset"], ["force-release", "Force release"]]) {
      if (lab.state !== "active" && action === "reset") continue;
      if (lab.state === "released") continue;
      const button = document.createElement("button");
      button.className = "secondary";
      button.textContent = label;
      button.addEventListener("click", async () => {
        // Two clicks: the first asks, the second acts (no native dialogs needed).
        if (button.dataset.armed !== "yes") {
          button.dataset.armed = "yes";
          button.textContent = `Confirm: ${label.toLowerCase()} ${lab.team_name}'s lab`;
          return;
        }
        try {
          await call("POST", `/api/v1/allocations/${lab.id}/${action}`, {});
          await refreshFocus();
        } catch (err) {
          text($("focus-error"), String(err));
        }
      });
      actions.append(button);
    }
    tr.append(cell(lab.team_name), cell(lab.template), cell(lab.host_name), cell(lab.state), actions);
    labRows.append(tr);
  }
}

async function refresh() {
  try {
    await Promise.all([refreshEvents(), refreshHosts()]);
    await refreshFocus();
    text($("link-state"), `Connected · updated ${new Date().toLocaleTimeString()}`);
  } catch (err) {
    // A laptop that lost Wi-Fi: say so and keep trying.
    text($("link-state"), `Appliance unreachable (${err}); retrying…`);
  }
}

$("create-event").addEventListener("click", async () => {
  text($("event-error"), "");
  try {
    await call("POST", "/api/v1/events", { name: $("event-name").value, starts_at: $("event-starts").value, ends_at: $("event-ends").value });
    $("event-name").value = "";
    await refreshEvents();
  } catch (err) {
    text($("event-error"), String(err));
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
    const [summary, ...rows] = String(err).split("\n");
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

$("focus-event").addEventListener("change", () => void refreshFocus().catch((err) => text($("focus-error"), String(err))));

$("announce").addEventListener("click", async () => {
  text($("focus-error"), "");
  try {
    await call("POST", `/api/v1/events/${$("focus-event").value}/announcements`, { text: $("announcement").value });
    $("announcement").value = "";
    await refreshFocus();
  } catch (err) {
    text($("focus-error"), String(err));
  }
});

$("save-badges").addEventListener("click", async () => {
  if (!lastImport) return;
  try {
    const badges = lastImport.participants.map((p) => ({ name: p.participant.name, team: p.participant.team_name, join_code: p.join_code }));
    const path = await invoke("save_badges", { event: lastImport.event?.name ?? "", eventCode: lastImport.event?.code ?? "", badges });
    text($("badges-result"), `Saved ${badges.length} badge(s) to ${path}`);
  } catch (err) {
    text($("badges-result"), String(err));
  }
});
