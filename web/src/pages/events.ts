import { api, LabEvent } from "../api";
import { pageHeading, stateBadge } from "../components";
import { clearError, errorBox, field, h, replace, showError, statusLine, table, withBusy } from "../dom";
import { formatDateTime, localInputToRfc3339, toLocalInputValue } from "../format";
import { canManageEvents, currentStaff } from "../session";

function eventRow(ev: LabEvent, highlight: boolean): HTMLTableRowElement {
  return h(
    "tr",
    { testid: "event-row", "data-event-id": String(ev.id), class: highlight ? "highlight" : null },
    h("td", null, h("a", { href: `#/events/${encodeURIComponent(String(ev.id))}`, testid: "event-link" }, ev.name)),
    h("td", null, stateBadge(ev.state, "event-row-state")),
    h("td", null, h("code", { class: "mono", testid: "event-row-code" }, ev.code)),
    h(
      "td",
      { class: "nowrap-cell" },
      h("span", { class: "sched" }, formatDateTime(ev.starts_at)),
      h("span", { class: "sched-sep" }, " – "),
      h("span", { class: "sched" }, formatDateTime(ev.ends_at)),
    ),
    h("td", { class: "num" }, String(ev.team_count)),
    h("td", { class: "num" }, String(ev.participant_count)),
  );
}

/** Default schedule for the create form: tomorrow 09:00 → the day after, 17:00 (local time). */
function defaultSchedule(): [string, string] {
  const start = new Date();
  start.setDate(start.getDate() + 1);
  start.setHours(9, 0, 0, 0);
  const end = new Date(start);
  end.setDate(end.getDate() + 1);
  end.setHours(17, 0, 0, 0);
  return [toLocalInputValue(start), toLocalInputValue(end)];
}

export function renderEvents(root: HTMLElement): void {
  const staff = currentStaff();
  const listBox = h("div", { testid: "events-list", "aria-busy": "true" }, h("p", { class: "muted" }, "Loading events…"));
  const listError = errorBox("events-error");
  let highlightId: string | null = null;

  async function load(): Promise<void> {
    listBox.setAttribute("aria-busy", "true");
    try {
      const { events } = await api.listEvents();
      clearError(listError);
      if (events.length === 0) {
        replace(
          listBox,
          h(
            "p",
            { class: "empty", testid: "events-empty" },
            canManageEvents(staff?.role) ? "No events yet. Create the first one below." : "No events yet.",
          ),
        );
      } else {
        const sorted = [...events].sort((a, b) => (a.starts_at < b.starts_at ? 1 : a.starts_at > b.starts_at ? -1 : 0));
        replace(
          listBox,
          table({
            caption: "Events",
            captionHidden: true,
            testid: "events-table",
            headers: ["Name", "State", "Code", "Schedule", "Teams", "Participants"],
            rows: sorted.map((ev) => eventRow(ev, String(ev.id) === highlightId)),
          }),
        );
      }
    } catch (err) {
      replace(listBox);
      showError(listError, err);
    } finally {
      listBox.setAttribute("aria-busy", "false");
    }
  }

  root.append(
    pageHeading("Events"),
    h("section", { "aria-labelledby": "events-list-h" }, h("h2", { id: "events-list-h", class: "visually-hidden" }, "All events"), listError, listBox),
  );

  if (canManageEvents(staff?.role)) root.append(createForm());
  if (staff && staff.role !== "judge") root.append(syncCard(root));
  void load();

  function createForm(): HTMLElement {
    const [defStart, defEnd] = defaultSchedule();
    const name = h("input", { type: "text", name: "name", required: true, maxlength: 200, testid: "event-name" });
    const startsAt = h("input", { type: "datetime-local", name: "starts_at", required: true, value: defStart, testid: "event-starts" });
    const endsAt = h("input", { type: "datetime-local", name: "ends_at", required: true, value: defEnd, testid: "event-ends" });
    const submit = h("button", { type: "submit", testid: "event-create-submit" }, "Create event");
    const error = errorBox("event-create-error");
    const status = statusLine("event-create-status");
    const fields = { name, starts_at: startsAt, ends_at: endsAt };
    const tz = Intl.DateTimeFormat().resolvedOptions().timeZone;

    const form = h(
      "form",
      { class: "card", testid: "event-create-form", novalidate: true, "aria-labelledby": "create-event-h" },
      h("h2", { id: "create-event-h" }, "Create an event"),
      field("Event name", name),
      h(
        "div",
        { class: "field-row" },
        field("Starts", startsAt, `Local time${tz ? ` (${tz})` : ""}`),
        field("Ends", endsAt),
      ),
      error,
      status,
      h("div", { class: "actions" }, submit),
    );

    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      clearError(error, fields);
      status.textContent = "";
      const n = name.value.trim();
      const s = localInputToRfc3339(startsAt.value);
      const e = localInputToRfc3339(endsAt.value);
      if (!n) {
        showError(error, new Error("Enter a name for the event."));
        name.setAttribute("aria-invalid", "true");
        name.focus();
        return;
      }
      if (!s || !e) {
        showError(error, new Error("Enter a start and an end date and time."));
        (s ? endsAt : startsAt).focus();
        return;
      }
      if (e <= s) {
        showError(error, new Error("The event must end after it starts."));
        endsAt.setAttribute("aria-invalid", "true");
        endsAt.focus();
        return;
      }
      try {
        const created = await withBusy(submit, "Creating…", () => api.createEvent({ name: n, starts_at: s, ends_at: e }));
        name.value = "";
        highlightId = String(created.id);
        replace(
          status,
          `Created “${created.name}” (code `,
          h("code", { class: "mono" }, created.code),
          "). ",
          h("a", { href: `#/events/${encodeURIComponent(String(created.id))}`, testid: "event-created-link" }, "Open it"),
        );
        await load();
      } catch (err) {
        showError(error, err, fields);
      }
    });
    return form;
  }
}

/** The cloud link: state, lag and the last error, refreshed while the page is open. */
function syncCard(page: HTMLElement): HTMLElement {
  const line = h("p", { testid: "sync-state" }, "…");
  const detail = h("p", { class: "muted", testid: "sync-detail" });
  const card = h("section", { class: "card", "aria-labelledby": "sync-h", testid: "sync-card" }, h("h2", { id: "sync-h" }, "Cloud sync"), line, detail);
  const load = async (): Promise<void> => {
    try {
      const s = await api.syncStatus();
      line.dataset.state = s.link.state;
      if (!s.link.configured) {
        line.textContent = "Not configured: scores and the ledger stay on this appliance (start it with --cloud to sync).";
        detail.textContent = `${s.pending_rows} change(s) recorded for the cloud.`;
        return;
      }
      const age = s.pending_age_ms == null ? "" : `, oldest ${Math.round(s.pending_age_ms / 1000)} s`;
      line.textContent = `${s.link.state === "linked" ? "Linked" : s.link.state} to ${s.link.cloud ?? "?"} — ${s.pending_rows} change(s) waiting${age}; ${s.link.acked} of ${s.last_seq} acknowledged.`;
      detail.textContent = s.link.last_error ? `Last error: ${s.link.last_error}` : "";
    } catch (err) {
      line.textContent = err instanceof Error ? err.message : String(err);
    }
  };
  void load();
  const timer = window.setInterval(() => {
    if (!page.isConnected) return window.clearInterval(timer);
    if (document.visibilityState === "visible") void load();
  }, 5000);
  return card;
}
