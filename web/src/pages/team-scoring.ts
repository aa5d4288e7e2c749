// The participant's scoring sections on "Your team": checks, submissions, hints and the
// assistant. Each section loads and refreshes on its own, so one failing call does not
// blank the others.

import { AgentMessage, api, Hint, MyChecks, Submission } from "../api";
import { errorBox, field, h, replace, showError, statusLine, table, withBusy } from "../dom";
import { formatDateTime } from "../format";

const CHECK_LABELS: Record<string, string> = {
  not_run: "not run yet",
  queued: "queued",
  running: "running…",
  passed: "passed",
  failed: "failed",
  error: "could not run",
  cancelled: "cancelled",
};

function section(id: string, title: string, testid: string): { root: HTMLElement; body: HTMLElement; error: HTMLDivElement } {
  const error = errorBox(`${testid}-error`);
  const body = h("div", { testid: `${testid}-body` }, h("p", { class: "muted" }, "Loading…"));
  const root = h("section", { class: "card", "aria-labelledby": id, testid }, h("h2", { id }, title), error, body);
  return { root, body, error };
}

/** Calls `load` now and every `ms` while `root` is on the page and the tab is visible. */
function every(root: HTMLElement, ms: number, load: () => Promise<void>): void {
  void load();
  const timer = window.setInterval(() => {
    if (!root.isConnected) return window.clearInterval(timer);
    if (document.visibilityState === "visible") void load();
  }, ms);
}

function checksSection(): HTMLElement {
  const { root, body, error } = section("me-checks-h", "Checks", "me-checks");
  const status = statusLine("checks-status");
  const run = h("button", { type: "button", testid: "run-checks" }, "Run my checks");
  const render = (data: MyChecks): void => {
    const rows = data.checks.map((c) =>
      h(
        "tr",
        { testid: "check-row", "data-state": c.state },
        h("td", { testid: "check-name" }, c.name),
        h("td", null, c.dimension),
        h("td", null, String(c.weight)),
        h("td", null, h("span", { class: `badge check-${c.state}`, testid: "check-state" }, CHECK_LABELS[c.state] ?? c.state)),
        h("td", { testid: "check-message" }, c.message ?? ""),
        h("td", null, c.finished_at ? formatDateTime(c.finished_at) : ""),
      ),
    );
    replace(
      body,
      h("p", null, "Points from visible checks: ", h("strong", { testid: "visible-points" }, String(data.visible_points)),
        data.hidden_checks ? ` · ${data.hidden_checks} hidden check(s) also count` : ""),
      rows.length
        ? table({ caption: "Your lab's checks", captionHidden: true, headers: ["Check", "Dimension", "Points", "Result", "Why", "When"], rows, testid: "checks-table" })
        : h("p", { class: "muted" }, "Your lab has no visible checks."),
      h("p", { class: "actions" }, run),
      status,
    );
    run.disabled = data.running;
    status.textContent = data.running ? "Your checks are running; results appear here." : "";
  };
  const load = async (): Promise<void> => {
    try {
      const data = await api.myChecks();
      if (root.isConnected) {
        error.hidden = true;
        render(data);
      }
    } catch (err) {
      if (root.isConnected) showError(error, err);
    }
  };
  run.addEventListener("click", () =>
    void withBusy(run, "Queueing…", async () => {
      try {
        const queued = await api.runMyChecks();
        status.textContent = `${queued.queued} check(s) queued.`;
        await load();
      } catch (err) {
        showError(error, err);
      }
    }),
  );
  every(root, 3000, load);
  return root;
}

function submissionsSection(): HTMLElement {
  const { root, body, error } = section("me-submit-h", "Submit", "me-submit");
  const version = h("input", { type: "text", required: true, maxlength: 100, testid: "submit-version", autocomplete: "off" });
  const note = h("input", { type: "text", maxlength: 500, testid: "submit-note", autocomplete: "off" });
  const button = h("button", { type: "submit", testid: "submit-button" }, "Submit this version");
  const status = statusLine("submit-status");
  const list = h("div", { testid: "submissions" });
  const form = h(
    "form",
    { class: "inline-form", novalidate: true },
    field("Version (commit, tag or label)", version),
    field("Note (optional)", note),
    button,
  );
  const renderList = (items: Submission[]): void => {
    replace(
      list,
      items.length
        ? h("ul", { class: "plain" }, items.map((s) => h("li", { testid: "submission" }, h("strong", null, s.version), ` — ${formatDateTime(s.submitted_at)}`, s.note ? ` · ${s.note}` : "")))
        : h("p", { class: "muted" }, "Nothing submitted yet. Submissions close when the event ends."),
    );
  };
  const load = async (): Promise<void> => {
    try {
      renderList(await api.mySubmissions());
    } catch (err) {
      if (root.isConnected) showError(error, err);
    }
  };
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    void withBusy(button, "Submitting…", async () => {
      try {
        const submitted = await api.submit(version.value.trim(), note.value.trim());
        status.textContent = `Submitted ${submitted.version}. Your checks will run on it.`;
        version.value = "";
        note.value = "";
        error.hidden = true;
        await load();
      } catch (err) {
        showError(error, err, { version, note });
      }
    });
  });
  replace(body, form, status, list);
  void load();
  return root;
}

function hintsSection(): HTMLElement {
  const { root, body, error } = section("me-hints-h", "Hints", "me-hints");
  const render = (hints: Hint[]): void => {
    if (!hints.length) return replace(body, h("p", { class: "muted" }, "No hints for this event."));
    replace(
      body,
      h(
        "ul",
        { class: "plain hints" },
        hints.map((hint) => {
          const item = h("li", { testid: "hint", "data-unlocked": hint.unlocked ? "yes" : "no" }, h("strong", null, hint.title), hint.cost ? ` (costs ${hint.cost} points)` : " (free)");
          if (hint.unlocked) {
            item.append(h("p", { testid: "hint-body" }, hint.body ?? ""));
          } else {
            const unlock = h("button", { type: "button", class: "secondary", testid: "unlock-hint" }, hint.cost ? `Unlock for ${hint.cost} points` : "Show");
            unlock.addEventListener("click", () =>
              void withBusy(unlock, "Unlocking…", async () => {
                try {
                  await api.unlockHint(hint.id);
                  render(await api.myHints());
                } catch (err) {
                  showError(error, err);
                }
              }),
            );
            item.append(" ", unlock);
          }
          return item;
        }),
      ),
    );
  };
  every(root, 30_000, async () => {
    try {
      render(await api.myHints());
    } catch (err) {
      if (root.isConnected) showError(error, err);
    }
  });
  return root;
}

function assistantSection(): HTMLElement {
  const { root, body, error } = section("me-assistant-h", "Assistant", "me-assistant");
  const question = h("textarea", { rows: 2, maxlength: 1000, testid: "assistant-question" });
  const ask = h("button", { type: "submit", testid: "assistant-ask" }, "Ask");
  const info = h("p", { class: "muted", testid: "assistant-info" });
  const list = h("div", { testid: "assistant-messages", "aria-live": "polite" });
  const form = h("form", { novalidate: true }, field("Ask for a hint about your lab", question), ask);
  const render = (messages: AgentMessage[]): void => {
    replace(
      list,
      messages.map((m) =>
        h("article", { class: `message from-${m.source}`, testid: "assistant-message", "data-source": m.source }, h("p", null, m.body), h("p", { class: "muted" }, `${m.source === "llm" ? "AI" : "Rules"} · ${formatDateTime(m.at)}`)),
      ),
    );
  };
  const load = async (): Promise<void> => {
    try {
      const data = await api.myMessages();
      info.textContent = data.model_configured
        ? `AI budget: ${data.tokens_used} of ${data.token_budget} tokens used.`
        : "No language model is configured here: answers come from the rules.";
      render(data.messages);
    } catch (err) {
      if (root.isConnected) showError(error, err);
    }
  };
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    void withBusy(ask, "Asking…", async () => {
      try {
        await api.ask(question.value.trim());
        question.value = "";
        error.hidden = true;
        await load();
      } catch (err) {
        showError(error, err, { question });
      }
    });
  });
  replace(body, info, form, list);
  every(root, 4000, load);
  return root;
}

function announcementsSection(): HTMLElement {
  const { root, body, error } = section("me-news-h", "Announcements", "me-announcements");
  every(root, 10_000, async () => {
    try {
      const items = await api.myAnnouncements();
      replace(
        body,
        items.length
          ? h("ul", { class: "plain", "aria-live": "polite" }, items.map((a) => h("li", { testid: "announcement" }, h("strong", null, formatDateTime(a.at)), " — ", a.text)))
          : h("p", { class: "muted" }, "No announcements yet."),
      );
    } catch (err) {
      if (root.isConnected) showError(error, err);
    }
  });
  return root;
}

/** The participant's scoring sections, appended to the team page. */
export function teamScoring(): HTMLElement[] {
  return [announcementsSection(), checksSection(), submissionsSection(), hintsSection(), assistantSection()];
}
