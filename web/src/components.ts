// Shared UI pieces.

import { EventState, IssuedJoinCode } from "./api";
import { h } from "./dom";
import { STATE_LABELS } from "./format";

export function stateBadge(state: EventState, testid = "event-state"): HTMLSpanElement {
  return h(
    "span",
    { class: `badge state-${state}`, testid, "data-state": state },
    STATE_LABELS[state] ?? state,
  );
}

/** Page heading; also sets the document title. Focusable so the router can move focus to it. */
export function pageHeading(text: string, testid = "page-title"): HTMLHeadingElement {
  document.title = `${text} · LabRack`;
  return h("h1", { tabindex: -1, testid }, text);
}

/** Mark an element (e.g. a results panel) for printing only that part of the page. */
function printOnly(panel: HTMLElement): void {
  document.body.classList.add("print-mode");
  panel.classList.add("print-target");
  const cleanup = (): void => {
    document.body.classList.remove("print-mode");
    panel.classList.remove("print-target");
    window.removeEventListener("afterprint", cleanup);
  };
  window.addEventListener("afterprint", cleanup);
  window.print();
  // Some browsers do not fire afterprint reliably.
  setTimeout(cleanup, 1000);
}

/**
 * Table of freshly issued join codes (shown only once by the server), with a hint
 * and a print button.
 */
export function joinCodesPanel(opts: {
  title: string;
  testid: string;
  eventName: string;
  eventCode: string;
  codes: IssuedJoinCode[];
  summary?: string;
  summaryTestid?: string;
}): HTMLElement {
  const panel = h("section", { class: "codes-panel", testid: opts.testid, "aria-label": opts.title });
  const printBtn = h("button", { type: "button", class: "secondary no-print", testid: `${opts.testid}-print` }, "Print");
  printBtn.addEventListener("click", () => printOnly(panel));
  const rows = opts.codes.map((c) =>
    h(
      "tr",
      { testid: "join-code-row", "data-participant-id": String(c.participant.id) },
      h("td", { testid: "join-code-team" }, c.participant.team_name),
      h("td", { testid: "join-code-name" }, c.participant.name),
      h("td", null, h("code", { class: "join-code", testid: "join-code" }, c.join_code)),
      h("td", { testid: "join-code-email" }, c.participant.email ?? ""),
    ),
  );
  panel.append(
    h("div", { class: "panel-head" }, h("h3", null, opts.title), printBtn),
    opts.summary ? h("p", { class: "status", role: "status", testid: opts.summaryTestid ?? null }, opts.summary) : "",
    h(
      "p",
      { class: "hint" },
      "Join codes are shown only once. Print this list (or copy it) and hand each participant their personal code. ",
      "They join at ",
      h("strong", null, `${location.origin}/#/join`),
      " with event code ",
      h("strong", { class: "mono" }, opts.eventCode),
      ` (${opts.eventName}).`,
    ),
    h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        null,
        h("caption", { class: "visually-hidden" }, opts.title),
        h(
          "thead",
          null,
          h("tr", null, ["Team", "Name", "Join code", "Email"].map((t) => h("th", { scope: "col" }, t))),
        ),
        h("tbody", null, rows),
      ),
    ),
  );
  return panel;
}
