// Staff and judges: the live leaderboard, judging, rejudging checks, the queue's dead
// letters, the rubric, hints and the observer's alerts for one event.

import { api, Rubric, Team } from "../api";
import { currentPrincipal } from "../session";
import { errorBox, field, h, replace, showError, statusLine, table, withBusy } from "../dom";
import { pageHeading } from "../components";
import { formatDateTime } from "../format";
import { boardTable } from "./scoreboard";

function card(id: string, title: string, testid: string, ...children: (HTMLElement | string)[]): HTMLElement {
  return h("section", { class: "card", "aria-labelledby": id, testid }, h("h2", { id }, title), ...children);
}

export function renderScoring(root: HTMLElement, eventId: string): void {
  const principal = currentPrincipal();
  const role = principal?.kind === "staff" ? principal.role : "judge";
  const canOperate = role !== "judge";
  const canWrite = role === "admin" || role === "organizer";
  const canJudge = role !== "staff";
  const heading = pageHeading("Scoring");
  const error = errorBox("scoring-error");
  root.append(
    heading,
    h("p", null, h("a", { href: `#/events/${encodeURIComponent(eventId)}` }, "← Event"), " · ",
      h("a", { href: `#/scoreboard/${encodeURIComponent(eventId)}`, target: "_blank", testid: "open-scoreboard" }, "Open the projector scoreboard")),
    error,
  );

  let teams: Team[] = [];
  let rubric: Rubric | null = null;

  // --- live leaderboard ---
  const boardBody = h("div", { testid: "leaderboard-body" }, h("p", { class: "muted" }, "Loading…"));
  root.append(card("board-h", "Leaderboard (live)", "leaderboard", boardBody));
  const loadBoard = async (): Promise<void> => {
    try {
      const board = await api.leaderboard(eventId);
      replace(boardBody, boardTable(board, "leaderboard-table", "Leaderboard"));
    } catch (err) {
      if (root.isConnected) showError(error, err);
    }
  };

  // --- team labs: anyone on staff may watch a desktop (view-only for judges and staff) ---
  const labsBody = h("div", { testid: "team-labs" }, h("p", { class: "muted" }, "Loading…"));
  root.append(card("labs-h", "Team labs", "team-labs-card", labsBody));
  const loadLabs = async (): Promise<void> => {
    try {
      const { allocations } = await api.listAllocations(eventId);
      const live = allocations.filter((a) => a.state === "active");
      replace(
        labsBody,
        live.length
          ? h("ul", { class: "plain" }, live.map((a) => h("li", { testid: "team-lab" }, `${a.team_name} · ${a.template} on ${a.host_name} · `, a.desktop_ready ? h("a", { href: `#/desktop/${a.id}`, testid: "watch-desktop" }, "Watch desktop") : h("span", { class: "muted" }, "no desktop"))))
          : h("p", { class: "muted" }, "No active labs."),
      );
    } catch (err) {
      if (root.isConnected) showError(error, err);
    }
  };

  // --- judging ---
  const judgeTeam = h("select", { testid: "judge-team" });
  const judgeFields = h("div", { class: "judge-fields" });
  const judgeComment = h("input", { type: "text", maxlength: 2000, testid: "judge-comment" });
  const judgeButton = h("button", { type: "submit", testid: "judge-submit" }, "Save scores");
  const judgeStatus = statusLine("judge-status");
  const judgeError = errorBox("judge-error");
  const judgeForm = h("form", { novalidate: true }, field("Team", judgeTeam), judgeFields, field("Comment (optional)", judgeComment), judgeButton);
  judgeForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const scores: Record<string, number> = {};
    for (const input of judgeFields.querySelectorAll<HTMLInputElement>("input[data-dimension]")) {
      if (input.value !== "") scores[input.dataset.dimension ?? ""] = Number(input.value);
    }
    void withBusy(judgeButton, "Saving…", async () => {
      try {
        await api.judge(judgeTeam.value, scores, judgeComment.value.trim());
        judgeStatus.textContent = "Saved.";
        judgeError.hidden = true;
        await loadBoard();
      } catch (err) {
        showError(judgeError, err);
      }
    });
  });
  if (canJudge) root.append(card("judge-h", "Judge a team", "judging", judgeError, judgeForm, judgeStatus));

  // --- rejudge and dead letters ---
  const rejudgeTeam = h("select", { testid: "rejudge-team" });
  const rejudgeCheck = h("input", { type: "text", maxlength: 128, testid: "rejudge-check", placeholder: "every check" });
  const rejudgeButton = h("button", { type: "submit", testid: "rejudge-submit" }, "Run checks as one batch");
  const rejudgeStatus = statusLine("rejudge-status");
  const rejudgeError = errorBox("rejudge-error");
  const rejudgeForm = h("form", { novalidate: true }, field("Team", rejudgeTeam), field("Check (name)", rejudgeCheck), rejudgeButton);
  const followBatch = async (batchId: number): Promise<void> => {
    for (;;) {
      if (!root.isConnected) return;
      const batch = await api.getBatch(batchId);
      const c = batch.counts;
      rejudgeStatus.textContent = `Batch ${batch.id}: ${c.passed} passed, ${c.failed} failed, ${c.error} could not run, ${c.queued + c.running} to go${batch.done ? " — done." : "…"}`;
      if (batch.done) return void loadBoard();
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  };
  rejudgeForm.addEventListener("submit", (event) => {
    event.preventDefault();
    void withBusy(rejudgeButton, "Queueing…", async () => {
      try {
        const queued = await api.queueChecks(eventId, {
          team_id: rejudgeTeam.value ? Number(rejudgeTeam.value) : undefined,
          check: rejudgeCheck.value.trim() || undefined,
          reason: "rejudge from the scoring page",
        });
        rejudgeError.hidden = true;
        const skipped = queued.skipped.map((s) => `${s.team}: ${s.reason}`).join("; ");
        rejudgeStatus.textContent = `${queued.queued} run(s) queued.${skipped ? ` Skipped: ${skipped}` : ""}`;
        void followBatch(queued.batch_id);
      } catch (err) {
        showError(rejudgeError, err, { check: rejudgeCheck });
      }
    });
  });
  const deadBody = h("div", { testid: "dead-letters" });
  const loadDead = async (): Promise<void> => {
    try {
      const { jobs } = await api.listJobs("dead");
      const rows = jobs.map((job) => {
        const requeue = h("button", { type: "button", class: "secondary", testid: "requeue" }, "Requeue");
        requeue.addEventListener("click", () =>
          void withBusy(requeue, "Requeueing…", async () => {
            try {
              await api.requeueJob(job.id);
              await loadDead();
            } catch (err) {
              showError(rejudgeError, err);
            }
          }),
        );
        return h("tr", { testid: "dead-job" }, h("td", null, String(job.id)), h("td", null, job.kind), h("td", null, `${job.attempts}/${job.max_attempts}`), h("td", null, job.last_error ?? ""), h("td", null, requeue));
      });
      replace(deadBody, rows.length ? table({ caption: "Dead letters", headers: ["Job", "Kind", "Attempts", "Last error", ""], rows, testid: "dead-table" }) : h("p", { class: "muted" }, "No dead letters."));
    } catch (err) {
      if (root.isConnected) showError(rejudgeError, err);
    }
  };
  if (canOperate) root.append(card("rejudge-h", "Checks and the queue", "rejudge", rejudgeError, rejudgeForm, rejudgeStatus, deadBody));

  // --- alerts ---
  const alertsBody = h("div", { testid: "alerts" });
  const loadAlerts = async (): Promise<void> => {
    try {
      const alerts = await api.alerts(eventId);
      const name = (id: number | null | undefined): string => teams.find((t) => Number(t.id) === id)?.name ?? (id == null ? "—" : `team ${id}`);
      replace(alertsBody, alerts.length ? h("ul", { class: "plain" }, alerts.map((a) => h("li", { testid: "alert" }, `${formatDateTime(a.at)} · ${name(a.team_id)}: ${a.detail}`))) : h("p", { class: "muted" }, "No alerts."));
    } catch (err) {
      if (root.isConnected) showError(error, err);
    }
  };
  if (canOperate) root.append(card("alerts-h", "Observer alerts", "alerts-card", alertsBody));

  // --- billing ledger ---
  const money = (cents: number): string => (cents / 100).toFixed(2);
  const ledgerBody = h("div", { testid: "ledger" });
  const ledgerError = errorBox("ledger-error");
  const creditAmount = h("input", { type: "number", step: "0.01", testid: "credit-amount" });
  const creditKind = h("select", { testid: "credit-kind" }, h("option", { value: "credit" }, "Credit (top-up)"), h("option", { value: "correction" }, "Correction"));
  const creditNote = h("input", { type: "text", maxlength: 500, testid: "credit-note" });
  const creditButton = h("button", { type: "submit", testid: "credit-submit" }, "Add entry");
  const creditForm = h("form", { novalidate: true, class: "inline-form" }, field("Kind", creditKind), field("Amount", creditAmount), field("Why", creditNote), creditButton);
  const renderLedger = (view: import("../api").LedgerView): void => {
    const b = view.balance;
    const rows = view.entries
      .slice()
      .reverse()
      .map((e) => h("tr", { testid: "ledger-row" }, h("td", null, formatDateTime(new Date(e.created_ms).toISOString())), h("td", null, e.kind), h("td", null, e.team_id === null ? "event" : (teams.find((t) => Number(t.id) === e.team_id)?.name ?? String(e.team_id))), h("td", { class: "num" }, `${Number(e.quantity.toFixed(3))} ${e.unit}`), h("td", { class: "num" }, money(e.amount_cents)), h("td", null, e.note)));
    replace(
      ledgerBody,
      h("p", { testid: "ledger-balance", "data-status": b.status }, `Balance ${money(b.balance_cents)} of ${money(b.credits_cents)} credited (${money(b.charges_cents)} charged) — ${b.status}. `,
        h("a", { href: `/api/v1/events/${encodeURIComponent(eventId)}/ledger.csv`, testid: "ledger-csv" }, "Download CSV")),
      rows.length ? table({ caption: "Ledger", captionHidden: true, headers: ["When", "Kind", "Who", "Quantity", "Amount", "Note"], rows, testid: "ledger-table" }) : h("p", { class: "muted" }, "No entries yet."),
    );
  };
  const loadLedger = async (): Promise<void> => {
    try {
      renderLedger(await api.ledger(eventId));
    } catch (err) {
      if (root.isConnected) showError(ledgerError, err);
    }
  };
  creditForm.addEventListener("submit", (event) => {
    event.preventDefault();
    void withBusy(creditButton, "Adding…", async () => {
      try {
        const cents = Math.round(Number(creditAmount.value) * 100);
        renderLedger(await api.addLedgerEntry(eventId, { kind: creditKind.value as "credit" | "correction", amount_cents: cents, note: creditNote.value.trim() }));
        creditAmount.value = "";
        creditNote.value = "";
        ledgerError.hidden = true;
      } catch (err) {
        showError(ledgerError, err, { amount_cents: creditAmount, note: creditNote });
      }
    });
  });
  if (canOperate) root.append(card("ledger-h", "Billing ledger", "ledger-card", ledgerError, canWrite ? creditForm : "", ledgerBody));

  // --- rubric and hints ---
  const rubricText = h("textarea", { rows: 10, class: "code", testid: "rubric-toml", spellcheck: "false" });
  const rubricButton = h("button", { type: "submit", testid: "rubric-save" }, "Save rubric");
  const rubricStatus = statusLine("rubric-status");
  const rubricError = errorBox("rubric-error");
  const rubricForm = h("form", { novalidate: true }, field("Rubric (TOML: [[dimension]] name, label, judge_max; [[bracket]] name, teams)", rubricText), rubricButton);
  rubricForm.addEventListener("submit", (event) => {
    event.preventDefault();
    void withBusy(rubricButton, "Saving…", async () => {
      try {
        rubric = await api.putRubric(eventId, rubricText.value);
        rubricStatus.textContent = `Saved: ${rubric.dimensions.length} dimension(s), ${rubric.brackets.length} bracket(s).`;
        rubricError.hidden = true;
        renderJudgeFields();
        await loadBoard();
      } catch (err) {
        showError(rubricError, err);
      }
    });
  });
  const hintTitle = h("input", { type: "text", maxlength: 120, testid: "hint-title" });
  const hintBody = h("textarea", { rows: 3, maxlength: 4000, testid: "hint-body-input" });
  const hintCost = h("input", { type: "number", min: 0, max: 1000, value: "0", testid: "hint-cost" });
  const hintButton = h("button", { type: "submit", testid: "hint-create" }, "Add hint");
  const hintStatus = statusLine("hint-status");
  const hintError = errorBox("hint-error");
  const hintForm = h("form", { novalidate: true }, field("Title", hintTitle), field("Text", hintBody), field("Cost in points", hintCost), hintButton);
  hintForm.addEventListener("submit", (event) => {
    event.preventDefault();
    void withBusy(hintButton, "Adding…", async () => {
      try {
        const hint = await api.createHint(eventId, { title: hintTitle.value.trim(), body: hintBody.value.trim(), cost: Number(hintCost.value) });
        hintStatus.textContent = `Added “${hint.title}”.`;
        hintTitle.value = "";
        hintBody.value = "";
        hintError.hidden = true;
      } catch (err) {
        showError(hintError, err, { title: hintTitle, body: hintBody, cost: hintCost });
      }
    });
  });
  if (canWrite) {
    root.append(card("rubric-h", "Rubric", "rubric", rubricError, rubricForm, rubricStatus));
    root.append(card("hints-h", "Hints", "hints-admin", hintError, hintForm, hintStatus));
  }

  function renderJudgeFields(): void {
    if (!rubric) return;
    replace(
      judgeFields,
      rubric.dimensions
        .filter((d) => d.judge_max > 0)
        .map((d) => field(`${d.label} (0–${d.judge_max})`, h("input", { type: "number", min: 0, max: d.judge_max, "data-dimension": d.name, testid: `judge-${d.name}` }))),
    );
  }

  async function start(): Promise<void> {
    try {
      [{ teams }, rubric] = await Promise.all([api.listTeams(eventId), api.getRubric(eventId)]);
      const options = teams.map((t) => h("option", { value: String(t.id) }, t.name));
      replace(judgeTeam, ...options.map((o) => o.cloneNode(true) as HTMLOptionElement));
      replace(rejudgeTeam, h("option", { value: "" }, "every team"), ...options);
      renderJudgeFields();
      rubricText.value = rubric.dimensions
        .map((d) => `[[dimension]]\nname = "${d.name}"\nlabel = "${d.label}"\njudge_max = ${d.judge_max}\n`)
        .concat(rubric.brackets.map((b) => `[[bracket]]\nname = "${b.name}"\nteams = [${b.teams.map((t) => JSON.stringify(t)).join(", ")}]\n`))
        .join("\n");
    } catch (err) {
      showError(error, err);
    }
    await Promise.all([loadBoard(), loadLabs(), canOperate ? loadDead() : Promise.resolve(), canOperate ? loadAlerts() : Promise.resolve(), canOperate ? loadLedger() : Promise.resolve()]);
  }
  void start();
  const poll = window.setInterval(() => {
    if (!root.isConnected) return window.clearInterval(poll);
    if (document.visibilityState !== "visible") return;
    void loadBoard();
    if (canOperate) {
      void loadDead();
      void loadAlerts();
    }
  }, 5000);
}
