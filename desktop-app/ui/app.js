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

async function refreshEvents() {
  const { events } = await call("GET", "/api/v1/events");
  const body = $("events");
  const select = $("import-event");
  const chosen = select.value;
  body.replaceChildren();
  select.replaceChildren();
  for (const ev of events) {
    const row = document.createElement("tr");
    row.dataset.testid = "event-row";
    row.append(cell(ev.name, "event-name-cell"), cell(ev.state), cell(ev.code), cell(String(ev.team_count)), cell(String(ev.participant_count), "event-people"));
    body.append(row);
    const option = document.createElement("option");
    option.value = String(ev.id);
    option.textContent = ev.name;
    select.append(option);
  }
  if (chosen) select.value = chosen;
}

async function refreshHosts() {
  const { hosts } = await call("GET", "/api/v1/hosts");
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

async function refresh() {
  try {
    await Promise.all([refreshEvents(), refreshHosts()]);
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
