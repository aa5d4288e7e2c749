import { api, ApiError, EventState, ImportResult, IssuedJoinCode, LabEvent, Participant, RowError, Team } from "../api";
import { joinCodesPanel, pageHeading, stateBadge } from "../components";
import {
  clearError,
  confirmButton,
  errorBox,
  field,
  h,
  replace,
  showError,
  statusLine,
  table,
  withBusy,
} from "../dom";
import { formatDateTime, formatRange, localInputToRfc3339, toLocalInputValue, transitionButton } from "../format";
import { canManageEvents, canManageParticipants, currentStaff } from "../session";
import { labsSection } from "./labs";

const CSV_EXAMPLE = "team,name,email\nRocket Owls,Ada Lovelace,ada@example.com\nRocket Owls,Grace Hopper,\n";

export function renderEvent(root: HTMLElement, eventId: string): void {
  const role = currentStaff()?.role;
  const manageEvents = canManageEvents(role);
  const manageParticipants = canManageParticipants(role);

  let ev: LabEvent | null = null;
  let teams: Team[] = [];
  let participants: Participant[] = [];
  const issued: IssuedJoinCode[] = [];

  const heading = pageHeading("Event");
  const pageError = errorBox("event-error");
  const summary = h("section", { class: "card event-summary", testid: "event-summary", "aria-label": "Event overview" });
  const content = h("div", { class: "event-content", hidden: true });

  root.append(
    h("p", { class: "breadcrumb" }, h("a", { href: "#/events", testid: "back-to-events" }, "← All events")),
    heading,
    pageError,
    h("p", { class: "muted", testid: "event-loading" }, "Loading event…"),
    summary,
    content,
  );
  summary.hidden = true;

  // ---------- sections ----------
  const teamsList = h("div", { testid: "teams-list" });
  const participantsList = h("div", { testid: "participants-list" });
  const issuedBox = h("div", { testid: "issued-codes-box" });
  const teamSelect = h("select", { name: "team_id", required: true, testid: "participant-team" });
  const filterInput = h("input", { type: "search", testid: "participant-filter", placeholder: "Name, team or email" });
  filterInput.addEventListener("input", () => renderParticipants());
  const filterField = field("Filter participants", filterInput);
  filterField.hidden = true;

  content.append(
    h(
      "section",
      { class: "card", "aria-labelledby": "teams-h", testid: "teams-section" },
      h("h2", { id: "teams-h" }, "Teams"),
      teamsList,
      manageParticipants ? createTeamForm() : "",
    ),
    h(
      "section",
      { class: "card", "aria-labelledby": "participants-h", testid: "participants-section" },
      h("h2", { id: "participants-h" }, "Participants"),
      filterField,
      participantsList,
      issuedBox,
      manageParticipants ? addParticipantForm() : "",
    ),
    manageParticipants ? importSection() : "",
    labsSection(eventId, () => teams),
  );

  // ---------- loading ----------
  void (async () => {
    try {
      const [e, t, p] = await Promise.all([
        api.getEvent(eventId),
        api.listTeams(eventId),
        api.listParticipants(eventId),
      ]);
      ev = e;
      teams = t.teams;
      participants = p.participants;
      root.querySelector('[data-testid="event-loading"]')?.remove();
      summary.hidden = false;
      content.hidden = false;
      renderSummary();
      renderTeams();
      renderParticipants();
    } catch (err) {
      root.querySelector('[data-testid="event-loading"]')?.remove();
      if (err instanceof ApiError && err.status === 404) {
        heading.textContent = "Event not found";
        document.title = "Event not found · LabRack";
      }
      showError(pageError, err);
    }
  })();

  async function refreshEvent(): Promise<void> {
    try {
      ev = await api.getEvent(eventId);
      renderSummary();
    } catch (err) {
      showError(pageError, err);
    }
  }

  async function refreshTeams(): Promise<void> {
    try {
      teams = (await api.listTeams(eventId)).teams;
      renderTeams();
    } catch (err) {
      showError(pageError, err);
    }
  }

  async function refreshParticipants(): Promise<void> {
    try {
      participants = (await api.listParticipants(eventId)).participants;
      renderParticipants();
    } catch (err) {
      showError(pageError, err);
    }
  }

  function refreshAll(): Promise<unknown> {
    return Promise.all([refreshEvent(), refreshTeams(), refreshParticipants()]);
  }

  // ---------- summary / state ----------
  function renderSummary(): void {
    if (!ev) return;
    const e = ev;
    heading.textContent = e.name;
    document.title = `${e.name} · LabRack`;
    const transitionError = errorBox("transition-error");
    const transitions = (e.next_states ?? []).map((to) => ({ to, ...transitionButton(e.state, to) }));

    const doTransition = async (to: EventState): Promise<void> => {
      clearError(transitionError);
      try {
        ev = await api.transition(e.id, to, e.state);
        renderSummary();
        (summary.querySelector('[data-testid="event-state-wrap"]') as HTMLElement | null)?.focus();
      } catch (err) {
        showError(transitionError, err);
        if (err instanceof ApiError && err.status === 409) void refreshEvent();
      }
    };

    const buttons = transitions.map((t) => {
      if (t.confirm) {
        return confirmButton({
          label: t.label,
          confirmLabel: t.confirm,
          testid: `transition-${t.to}`,
          onConfirm: () => doTransition(t.to),
        });
      }
      const b = h("button", { type: "button", testid: `transition-${t.to}` }, t.label);
      b.addEventListener("click", () => void withBusy(b, "Working…", () => doTransition(t.to)));
      return b;
    });

    replace(
      summary,
      h(
        "div",
        { class: "summary-grid" },
        h(
          "div",
          { class: "code-block" },
          h("div", { class: "code-label", id: "event-code-label" }, "Event code"),
          h("div", { class: "event-code mono", testid: "event-code", "aria-labelledby": "event-code-label" }, e.code),
          h("p", { class: "hint" }, "Participants enter this code plus their personal join code at ", h("strong", null, `${location.origin}/#/join`), "."),
        ),
        h(
          "dl",
          { class: "facts" },
          h("dt", null, "State"),
          h("dd", null, h("span", { tabindex: -1, class: "focus-target", testid: "event-state-wrap" }, stateBadge(e.state))),
          h("dt", null, "Schedule"),
          h("dd", { testid: "event-schedule" }, formatRange(e.starts_at, e.ends_at)),
          h("dt", null, "Teams"),
          h("dd", { testid: "event-team-count" }, String(e.team_count)),
          h("dt", null, "Participants"),
          h("dd", { testid: "event-participant-count" }, String(e.participant_count)),
          h("dt", null, "Scoring"),
          h(
            "dd",
            null,
            h("a", { href: `#/events/${encodeURIComponent(String(e.id))}/scoring`, testid: "open-scoring" }, "Leaderboard, judging and checks"),
            " · ",
            h("a", { href: `#/scoreboard/${encodeURIComponent(String(e.id))}`, testid: "open-projector" }, "Projector scoreboard"),
          ),
        ),
      ),
      manageEvents
        ? h(
            "div",
            { class: "transitions", testid: "transitions" },
            h("h2", { class: "small-heading" }, "Change state"),
            buttons.length
              ? h("div", { class: "button-row" }, buttons)
              : h("p", { class: "muted" }, "This event is archived; no further state changes."),
            transitionError,
          )
        : "",
      manageEvents ? editForm(e) : "",
    );
  }

  function editForm(e: LabEvent): HTMLElement {
    const name = h("input", { type: "text", name: "name", required: true, value: e.name, testid: "edit-event-name" });
    const startsAt = h("input", { type: "datetime-local", name: "starts_at", value: toLocalInputValue(e.starts_at), testid: "edit-event-starts" });
    const endsAt = h("input", { type: "datetime-local", name: "ends_at", value: toLocalInputValue(e.ends_at), testid: "edit-event-ends" });
    const submit = h("button", { type: "submit", testid: "edit-event-submit" }, "Save changes");
    const error = errorBox("edit-event-error");
    const fields = { name, starts_at: startsAt, ends_at: endsAt };
    const form = h(
      "form",
      { testid: "edit-event-form", novalidate: true },
      field("Event name", name),
      h("div", { class: "field-row" }, field("Starts", startsAt), field("Ends", endsAt)),
      error,
      h("div", { class: "actions" }, submit),
    );
    form.addEventListener("submit", async (evt) => {
      evt.preventDefault();
      clearError(error, fields);
      const patch: { name?: string; starts_at?: string; ends_at?: string } = {};
      const n = name.value.trim();
      if (!n) {
        showError(error, new Error("The event needs a name."));
        name.focus();
        return;
      }
      if (n !== e.name) patch.name = n;
      const s = localInputToRfc3339(startsAt.value);
      const en = localInputToRfc3339(endsAt.value);
      if (!s || !en) {
        showError(error, new Error("Enter a start and an end date and time."));
        return;
      }
      if (en <= s) {
        showError(error, new Error("The event must end after it starts."));
        endsAt.focus();
        return;
      }
      if (toLocalInputValue(e.starts_at) !== startsAt.value) patch.starts_at = s;
      if (toLocalInputValue(e.ends_at) !== endsAt.value) patch.ends_at = en;
      if (Object.keys(patch).length === 0) {
        showError(error, new Error("Nothing changed."));
        return;
      }
      try {
        ev = await withBusy(submit, "Saving…", () => api.updateEvent(e.id, patch));
        renderSummary();
      } catch (err) {
        showError(error, err, fields);
      }
    });
    return h("details", { class: "edit-event", testid: "edit-event" }, h("summary", null, "Edit name and schedule"), form);
  }

  // ---------- teams ----------
  function renderTeams(): void {
    if (teams.length === 0) {
      replace(teamsList, h("p", { class: "empty", testid: "teams-empty" }, "No teams yet."));
    } else {
      const sorted = [...teams].sort((a, b) => a.name.localeCompare(b.name));
      replace(
        teamsList,
        table({
          caption: "Teams",
          captionHidden: true,
          testid: "teams-table",
          headers: ["Team", "Participants", "Created"],
          rows: sorted.map((t) =>
            h(
              "tr",
              { testid: "team-row", "data-team-id": String(t.id) },
              h("td", { testid: "team-row-name" }, t.name),
              h("td", { class: "num", testid: "team-row-count" }, String(t.participant_count)),
              h("td", null, formatDateTime(t.created_at)),
            ),
          ),
        }),
      );
    }
    // Keep the add-participant team picker in sync.
    const previous = teamSelect.value;
    replace(
      teamSelect,
      h("option", { value: "", disabled: true }, teams.length ? "Choose a team…" : "No teams yet — create one first"),
      [...teams]
        .sort((a, b) => a.name.localeCompare(b.name))
        .map((t) => h("option", { value: String(t.id) }, t.name)),
    );
    teamSelect.value = teams.some((t) => String(t.id) === previous) ? previous : "";
    teamSelect.disabled = teams.length === 0;
  }

  function createTeamForm(): HTMLElement {
    const name = h("input", { type: "text", name: "name", required: true, maxlength: 200, testid: "team-name-input" });
    const submit = h("button", { type: "submit", testid: "team-create-submit" }, "Add team");
    const error = errorBox("team-create-error");
    const status = statusLine("team-create-status");
    const form = h(
      "form",
      { class: "inline-form", testid: "team-create-form", novalidate: true },
      h("h3", null, "Add a team"),
      h("div", { class: "field-row" }, field("Team name", name), h("div", { class: "actions align-end" }, submit)),
      error,
      status,
    );
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      clearError(error, { name });
      status.textContent = "";
      const n = name.value.trim();
      if (!n) {
        showError(error, new Error("Enter a team name."));
        name.focus();
        return;
      }
      try {
        const team = await withBusy(submit, "Adding…", () => api.createTeam(eventId, n));
        name.value = "";
        status.textContent = `Team “${team.name}” added.`;
        teams = [...teams, team];
        renderTeams();
        void refreshEvent();
        name.focus();
      } catch (err) {
        showError(error, err, { name });
      }
    });
    return form;
  }

  // ---------- participants ----------
  function renderParticipants(): void {
    const q = filterInput.value.trim().toLowerCase();
    const visible = participants
      .filter((p) => !q || [p.name, p.team_name, p.email ?? ""].some((s) => s.toLowerCase().includes(q)))
      .sort((a, b) => a.team_name.localeCompare(b.team_name) || a.name.localeCompare(b.name));
    filterField.hidden = participants.length < 2;
    if (participants.length === 0) {
      replace(participantsList, h("p", { class: "empty", testid: "participants-empty" }, "No participants yet."));
      return;
    }
    const headers = ["Team", "Name", "Email", "Joined"];
    if (manageParticipants) headers.push("Join code");
    replace(
      participantsList,
      h("p", { class: "muted", testid: "participants-count" }, q ? `${visible.length} of ${participants.length} participants` : `${participants.length} participants`),
      table({
        caption: "Participants",
        captionHidden: true,
        testid: "participants-table",
        headers,
        rows: visible.map((p) =>
          h(
            "tr",
            { testid: "participant-row", "data-participant-id": String(p.id) },
            h("td", { testid: "participant-team-name" }, p.team_name),
            h("td", { testid: "participant-name" }, p.name),
            h("td", { testid: "participant-email" }, p.email ?? h("span", { class: "muted" }, "—")),
            h(
              "td",
              { testid: "participant-joined", "data-joined": p.joined_at ? "yes" : "no" },
              p.joined_at
                ? h("span", { class: "joined-yes", title: formatDateTime(p.joined_at) }, "✓ Joined")
                : h("span", { class: "muted" }, "Not yet"),
            ),
            manageParticipants
              ? h(
                  "td",
                  null,
                  confirmButton({
                    label: "New code",
                    confirmLabel: "Replace code",
                    testid: "regen-join-code",
                    onConfirm: () => regenerate(p),
                  }),
                )
              : "",
          ),
        ),
      }),
    );
  }

  async function regenerate(p: Participant): Promise<void> {
    try {
      const res = await api.regenerateJoinCode(p.id);
      issued.unshift(res);
      renderIssued(`New join code for ${res.participant.name}. The previous code no longer works.`);
    } catch (err) {
      showError(pageError, err);
      pageError.scrollIntoView({ block: "nearest" });
    }
  }

  function renderIssued(message: string): void {
    if (!ev || issued.length === 0) {
      replace(issuedBox);
      return;
    }
    replace(
      issuedBox,
      joinCodesPanel({
        title: "Join codes issued on this page",
        testid: "issued-codes",
        eventName: ev.name,
        eventCode: ev.code,
        codes: issued,
        summary: message,
        summaryTestid: "issued-codes-summary",
      }),
    );
  }

  function addParticipantForm(): HTMLElement {
    const name = h("input", { type: "text", name: "name", required: true, maxlength: 200, testid: "participant-name-input" });
    const email = h("input", { type: "email", name: "email", autocomplete: "off", testid: "participant-email-input" });
    const submit = h("button", { type: "submit", testid: "participant-create-submit" }, "Add participant");
    const error = errorBox("participant-create-error");
    const fields = { team_id: teamSelect, name, email };
    const form = h(
      "form",
      { class: "inline-form", testid: "participant-create-form", novalidate: true },
      h("h3", null, "Add a participant"),
      h("div", { class: "field-row" }, field("Team", teamSelect), field("Name", name), field("Email (optional)", email)),
      error,
      h("div", { class: "actions" }, submit),
    );
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      clearError(error, fields);
      const team = teams.find((t) => String(t.id) === teamSelect.value);
      if (!team) {
        showError(error, new Error(teams.length ? "Choose a team." : "Create a team first."));
        teamSelect.focus();
        return;
      }
      const n = name.value.trim();
      if (!n) {
        showError(error, new Error("Enter the participant's name."));
        name.focus();
        return;
      }
      const em = email.value.trim();
      try {
        const res = await withBusy(submit, "Adding…", () =>
          api.createParticipant(eventId, em ? { team_id: team.id, name: n, email: em } : { team_id: team.id, name: n }),
        );
        name.value = "";
        email.value = "";
        issued.unshift(res);
        renderIssued(`Added ${res.participant.name} to ${res.participant.team_name}.`);
        participants = [...participants, res.participant];
        renderParticipants();
        void refreshTeams();
        void refreshEvent();
        name.focus();
      } catch (err) {
        showError(error, err, fields);
      }
    });
    return form;
  }

  // ---------- CSV import ----------
  function importSection(): HTMLElement {
    const file = h("input", { type: "file", accept: ".csv,text/csv,text/plain", testid: "csv-file" });
    const text = h("textarea", {
      name: "csv",
      rows: 8,
      spellcheck: "false",
      class: "mono",
      testid: "csv-text",
      placeholder: CSV_EXAMPLE,
    });
    const submit = h("button", { type: "submit", testid: "csv-import-submit" }, "Import participants");
    const error = errorBox("csv-import-error");
    const rowErrors = h("div", { testid: "csv-errors-box" });
    const results = h("div", { testid: "import-results-box" });
    const fileStatus = statusLine("csv-file-status");

    file.addEventListener("change", async () => {
      const f = file.files?.[0];
      if (!f) return;
      try {
        // Strip a UTF-8 byte-order mark (spreadsheet exports often add one).
        text.value = (await f.text()).replace(/^\uFEFF/, "");
        fileStatus.textContent = `Loaded ${f.name} (${text.value.split(/\r?\n/).filter((l) => l.trim()).length} non-empty lines). Review it below, then import.`;
      } catch {
        showError(error, new Error(`Could not read ${f.name}.`));
      }
    });

    const form = h(
      "form",
      { testid: "csv-import-form", novalidate: true },
      h(
        "p",
        { class: "hint" },
        "Header line ",
        h("code", null, "team,name,email"),
        " (email may be empty). Teams are created as needed. If any row is invalid, nothing is imported.",
      ),
      field("CSV file", file),
      fileStatus,
      field("…or paste CSV", text),
      error,
      rowErrors,
      h("div", { class: "actions" }, submit),
      results,
    );

    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      clearError(error);
      replace(rowErrors);
      const csv = text.value;
      if (!csv.trim()) {
        showError(error, new Error("Choose a CSV file or paste CSV text first."));
        text.focus();
        return;
      }
      try {
        const res = await withBusy(submit, "Importing…", () => api.importCsv(eventId, csv));
        text.value = "";
        file.value = "";
        fileStatus.textContent = "";
        showImportResults(results, res);
        await refreshAll();
        (results.querySelector("h3") as HTMLElement | null)?.scrollIntoView({ block: "nearest" });
      } catch (err) {
        replace(results);
        showError(error, err);
        if (err instanceof ApiError && err.problem.errors && err.problem.errors.length) {
          replace(rowErrors, csvErrorsTable(err.problem.errors));
        }
      }
    });

    return h(
      "section",
      { class: "card", "aria-labelledby": "import-h", testid: "import-section" },
      h("h2", { id: "import-h" }, "Import participants from CSV"),
      form,
    );
  }

  function showImportResults(box: HTMLElement, res: ImportResult): void {
    if (!ev) return;
    const teamsText = res.teams_created === 1 ? "1 new team" : `${res.teams_created} new teams`;
    const partText = res.imported === 1 ? "1 participant" : `${res.imported} participants`;
    replace(
      box,
      joinCodesPanel({
        title: "Imported participants and their join codes",
        testid: "import-results",
        eventName: ev.name,
        eventCode: ev.code,
        codes: res.participants,
        summary: `Imported ${partText}, created ${teamsText}.`,
        summaryTestid: "import-summary",
      }),
    );
  }
}

function csvErrorsTable(errors: RowError[]): HTMLElement {
  const sorted = [...errors].sort((a, b) => a.line - b.line);
  return h(
    "div",
    { class: "csv-errors" },
    h("p", null, h("strong", null, `${sorted.length} ${sorted.length === 1 ? "row has" : "rows have"} errors. Nothing was imported — fix them and try again.`)),
    h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        { testid: "csv-errors" },
        h("caption", { class: "visually-hidden" }, "CSV row errors"),
        h("thead", null, h("tr", null, h("th", { scope: "col", class: "line-cell" }, "Line"), h("th", { scope: "col" }, "Problem"))),
        h(
          "tbody",
          null,
          sorted.map((r) =>
            h(
              "tr",
              { testid: "csv-error-row", "data-line": String(r.line) },
              h("td", { class: "line-cell", testid: "csv-error-line" }, String(r.line)),
              h("td", { testid: "csv-error-reason" }, r.reason),
            ),
          ),
        ),
      ),
    ),
  );
}
