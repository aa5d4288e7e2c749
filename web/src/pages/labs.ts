// Lab hosts, lab templates, an event's lab allocations, and the badge of a lab's state.

import { Allocation, AllocationState, api, ApiError, LabHost, Team } from "../api";
import { pageHeading } from "../components";
import { clearError, confirmButton, errorBox, field, h, replace, showError, statusLine, table, withBusy } from "../dom";
import { formatDateTime } from "../format";
import { canManageEvents, canManageParticipants, currentStaff } from "../session";

const LAB_LABELS: Record<AllocationState, string> = {
  requested: "Requested",
  provisioning: "Being prepared",
  active: "Ready",
  releasing: "Being removed",
  released: "Removed",
  failed: "Failed",
  release_failed: "Removal failed",
  unreachable: "Host unreachable",
};

export function labBadge(a: Pick<Allocation, "state" | "busy">, testid = "lab-state"): HTMLSpanElement {
  const text = a.state === "active" && a.busy ? "Resetting…" : LAB_LABELS[a.state] ?? a.state;
  return h("span", { class: `badge lab-${a.state}`, testid, "data-state": a.state, "data-busy": a.busy ? "yes" : "no" }, text);
}

function bytes(n: number | null | undefined): string {
  if (n === null || n === undefined) return "–";
  const gib = n / 1024 ** 3;
  return gib >= 1 ? `${gib.toFixed(1)} GiB` : `${(n / 1024 ** 2).toFixed(0)} MiB`;
}

function gpuSummary(host: LabHost): HTMLElement {
  const g = host.telemetry?.gpus;
  if (!g) return h("span", { class: "muted" }, "no telemetry yet");
  if (g.status === "no_gpu") return h("span", { class: "muted", title: g.reason }, "no NVIDIA GPU");
  return h(
    "ul",
    { class: "plain" },
    g.devices.map((d) =>
      h(
        "li",
        { testid: "gpu" },
        `${d.name}: ${d.utilization_percent ?? "–"} % · ${bytes(d.memory_used_bytes)} / ${bytes(d.memory_total_bytes)} · ${d.temperature_celsius ?? "–"} °C · ${d.power_watts?.toFixed(0) ?? "–"} W`,
      ),
    ),
  );
}

export function renderHosts(root: HTMLElement): void {
  const heading = pageHeading("Lab hosts");
  const error = errorBox("hosts-error");
  const list = h("div", { testid: "hosts-list" }, h("p", { class: "muted" }, "Loading…"));
  root.append(heading, error, h("section", { class: "card" }, h("h2", null, "Enrolled hosts"), list));
  if (canManageEvents(currentStaff()?.role)) root.append(tokenForm());

  async function load(): Promise<void> {
    try {
      const { hosts, heartbeat_secs } = await api.listHosts();
      if (!root.isConnected) return;
      error.hidden = true;
      if (!hosts.length) {
        replace(list, h("p", { class: "muted", testid: "no-hosts" }, "No lab host is enrolled yet. Create an enrolment token below and run labrack-host enrol on the lab machine."));
        return;
      }
      replace(
        list,
        table({
          caption: `Hosts (heartbeat every ${heartbeat_secs} s)`,
          headers: ["Host", "Health", "Labs", "CPU", "Memory", "GPUs", "Last seen"],
          testid: "hosts-table",
          rows: hosts.map((host) =>
            h(
              "tr",
              { testid: "host-row", "data-name": host.name },
              h("td", null, h("strong", null, host.name), h("br"), h("span", { class: "muted" }, host.address)),
              h("td", null, host.healthy ? h("span", { class: "badge lab-active", testid: "host-health" }, "healthy") : h("span", { class: "badge lab-failed", testid: "host-health" }, "unreachable")),
              h("td", null, `${host.labs_in_use} / ${host.capacity}`),
              h("td", null, host.telemetry ? `${host.telemetry.cpu_percent.toFixed(0)} % of ${host.telemetry.cpu_count}` : "–"),
              h("td", null, host.telemetry ? `${bytes(host.telemetry.memory_used_bytes)} / ${bytes(host.telemetry.memory_total_bytes)}` : "–"),
              h("td", null, `${host.gpus} `, gpuSummary(host)),
              h("td", null, formatDateTime(host.last_seen_at)),
            ),
          ),
        }),
      );
    } catch (err) {
      if (root.isConnected) showError(error, err);
    }
  }

  void load();
  const timer = window.setInterval(() => {
    if (!root.isConnected) return window.clearInterval(timer);
    if (document.visibilityState === "visible") void load();
  }, 5000);
}

function tokenForm(): HTMLElement {
  const ttl = h("input", { type: "number", min: "1", max: "168", value: "1", name: "ttl_hours", testid: "token-ttl" });
  const note = h("input", { type: "text", name: "note", maxlength: "200", testid: "token-note", placeholder: "rack slot 3" });
  const error = errorBox("token-error");
  const out = h("div", { testid: "token-out" });
  const submit = h("button", { type: "submit", testid: "token-create" }, "Create enrolment token");
  const form = h("form", { class: "stack" }, field("Valid for (hours)", ttl), field("Note", note), submit);
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    void withBusy(submit, "Creating…", async () => {
      clearError(error);
      try {
        const hours = Number(ttl.value);
        const issued = await api.createEnrolmentToken({ ttl_secs: Math.round(hours * 3600), note: note.value.trim() || undefined });
        const origin = location.origin;
        replace(
          out,
          h("p", null, "Shown once. Valid until ", formatDateTime(issued.expires_at), ", for one host:"),
          h("pre", { class: "code", testid: "token-value" }, issued.token),
          h("p", null, "On the lab machine, as root (copy the appliance CA from data/tls/ca.pem first):"),
          h("pre", { class: "code" }, `labrack-host enrol --appliance ${origin} --ca ca.pem --token ${issued.token}\nlabrack-host run`),
        );
      } catch (err) {
        showError(error, err, { ttl_secs: ttl, note });
      }
    });
  });
  return h("section", { class: "card", "aria-labelledby": "token-h" }, h("h2", { id: "token-h" }, "Enrol a host"), error, form, out);
}

export function renderTemplates(root: HTMLElement): void {
  const heading = pageHeading("Lab templates");
  const error = errorBox("templates-error");
  const status = statusLine("templates-status");
  const editor = h("textarea", { rows: 18, spellcheck: "false", class: "code", testid: "templates-source", name: "templates" });
  const list = h("div", { testid: "templates-list" });
  const errors = h("ul", { class: "row-errors", testid: "templates-errors" });
  const save = h("button", { type: "submit", testid: "templates-save" }, "Save templates");
  const canEdit = canManageEvents(currentStaff()?.role);
  editor.readOnly = !canEdit;
  const form = h("form", { class: "stack" }, field("Templates (TOML)", editor, "Each [[template]] names a runtime (local-user), a skeleton directory on the hosts, GPUs and checks. A file with any error changes nothing."), errors, canEdit ? save : "");
  root.append(heading, error, status, h("section", { class: "card" }, h("h2", null, "Defined templates"), list), h("section", { class: "card" }, form));

  function show(templates: { name: string; runtime: string; gpus: number; skeleton: string; checks: unknown[] }[]): void {
    replace(
      list,
      templates.length
        ? table({
            caption: "Templates",
            captionHidden: true,
            headers: ["Name", "Runtime", "GPUs", "Skeleton", "Checks"],
            testid: "templates-table",
            rows: templates.map((t) => h("tr", { testid: "template-row" }, h("td", null, t.name), h("td", null, t.runtime), h("td", null, String(t.gpus)), h("td", null, h("code", null, t.skeleton)), h("td", null, String(t.checks.length)))),
          })
        : h("p", { class: "muted" }, "No templates yet."),
    );
  }

  void api.listTemplates().then(
    (set) => {
      editor.value = set.source;
      show(set.templates);
    },
    (err) => showError(error, err),
  );
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    void withBusy(save, "Saving…", async () => {
      clearError(error);
      replace(errors);
      status.textContent = "";
      try {
        const set = await api.putTemplates(editor.value);
        show(set.templates);
        status.textContent = `Saved ${set.templates.length} template(s).`;
      } catch (err) {
        showError(error, err);
        if (err instanceof ApiError && err.problem.errors) {
          replace(errors, err.problem.errors.map((e) => h("li", { testid: "template-error" }, `Line ${e.line}: ${e.reason}`)));
        }
      }
    });
  });
}

/** The "Labs" card of an event page: allocate, reset, release. */
export function labsSection(eventId: string, teams: () => Team[]): HTMLElement {
  const role = currentStaff()?.role;
  const operate = canManageParticipants(role);
  const force = canManageEvents(role);
  const error = errorBox("labs-error");
  const list = h("div", { testid: "labs-list" });
  const teamSelect = h("select", { name: "team", testid: "lab-team" });
  const templateSelect = h("select", { name: "template", testid: "lab-template" });
  const submit = h("button", { type: "submit", testid: "lab-allocate" }, "Allocate lab");
  const form = h("form", { class: "inline-form" }, field("Team", teamSelect), field("Template", templateSelect), submit);
  const section = h("section", { class: "card", "aria-labelledby": "labs-h", testid: "labs-section" }, h("h2", { id: "labs-h" }, "Labs"), error, list, operate ? form : "");

  async function load(): Promise<void> {
    try {
      const [{ allocations }, templates] = await Promise.all([api.listAllocations(eventId), operate ? api.listTemplates() : Promise.resolve(null)]);
      if (!section.isConnected) return;
      render(allocations);
      if (templates) {
        const chosen = templateSelect.value;
        replace(templateSelect, templates.templates.map((t) => h("option", { value: t.name }, t.name)));
        if (chosen) templateSelect.value = chosen;
      }
      const live = new Set(allocations.filter((a) => a.state !== "released").map((a) => String(a.team_id)));
      const chosenTeam = teamSelect.value;
      replace(teamSelect, teams().filter((t) => !live.has(String(t.id))).map((t) => h("option", { value: String(t.id) }, t.name)));
      if (chosenTeam) teamSelect.value = chosenTeam;
    } catch (err) {
      if (section.isConnected) showError(error, err);
    }
  }

  function act(label: string, testid: string, run: () => Promise<unknown>, danger = false): HTMLElement {
    const action = async (): Promise<void> => {
      clearError(error);
      try {
        await run();
      } catch (err) {
        showError(error, err);
      }
      await load();
    };
    if (danger) return confirmButton({ label, confirmLabel: `Yes, ${label.toLowerCase()}`, testid, onConfirm: action });
    const b = h("button", { type: "button", class: "secondary", testid }, label);
    b.addEventListener("click", () => void withBusy(b, "…", action));
    return b;
  }

  function render(allocations: Allocation[]): void {
    if (!allocations.length) {
      replace(list, h("p", { class: "muted", testid: "no-labs" }, "No team has a lab yet."));
      return;
    }
    replace(
      list,
      table({
        caption: "Lab allocations",
        captionHidden: true,
        headers: ["Team", "Lab", "Host", "State", ""],
        testid: "labs-table",
        rows: allocations.map((a) =>
          h(
            "tr",
            { testid: "lab-row", "data-team": a.team_name },
            h("td", null, a.team_name),
            h("td", null, a.template),
            h("td", null, a.host_name),
            h("td", null, labBadge(a), a.reason ? h("div", { class: "muted small", testid: "lab-reason" }, a.reason) : ""),
            h(
              "td",
              { class: "actions" },
              operate && a.state === "active" && !a.busy ? act("Reset", "lab-reset", () => api.resetAllocation(a.id), true) : "",
              operate && a.resumable ? act("Resume", "lab-resume", () => api.resumeAllocation(a.id), true) : "",
              operate && ["active", "failed", "release_failed", "unreachable"].includes(a.state) ? act("Release", "lab-release", () => api.releaseAllocation(a.id), true) : "",
              force && a.state !== "released" ? act("Force release", "lab-force-release", () => api.forceReleaseAllocation(a.id), true) : "",
              a.state === "active" ? h("a", { href: `#/desktop/${a.id}`, testid: "lab-watch" }, "Watch") : "",
              " ",
              operate && a.state === "active" ? h("a", { href: `#/terminal/${a.id}`, testid: "lab-terminal" }, "Terminal") : "",
            ),
          ),
        ),
      }),
    );
  }

  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    void withBusy(submit, "Allocating…", async () => {
      clearError(error);
      try {
        await api.allocate(teamSelect.value, templateSelect.value);
      } catch (err) {
        showError(error, err, { template: templateSelect });
      }
      await load();
    });
  });

  void load();
  const timer = window.setInterval(() => {
    if (!section.isConnected) return window.clearInterval(timer);
    if (document.visibilityState === "visible") void load();
  }, 3000);
  return section;
}
