import { Allocation, api, MeResponse } from "../api";
import { pageHeading, stateBadge } from "../components";
import { confirmButton, errorBox, h, replace, showError } from "../dom";
import { labBadge } from "./labs";
import { formatDateTime, formatDuration } from "../format";
import { teamScoring } from "./team-scoring";

const REFRESH_MS = 30_000;

export function renderMe(root: HTMLElement): void {
  const heading = pageHeading("Your team");
  const error = errorBox("me-error");
  const body = h("div", { testid: "me-body", "aria-busy": "true" }, h("p", { class: "muted" }, "Loading…"));
  const countdown = h("p", { class: "countdown", testid: "countdown", "aria-live": "off" });
  const lab = h("section", { class: "card", "aria-labelledby": "me-lab-h", testid: "me-lab" });
  const labError = errorBox("lab-error");
  root.append(heading, error, body, lab, ...teamScoring());

  let data: MeResponse | null = null;

  function renderLab(a: Allocation | null): void {
    const title = h("h2", { id: "me-lab-h" }, "Your lab");
    if (!a) {
      replace(lab, title, h("p", { class: "muted", testid: "no-lab" }, "Your team has no lab yet. The organizers will set it up."));
      return;
    }
    replace(
      lab,
      title,
      labError,
      h("dl", { class: "facts" }, h("dt", null, "Lab"), h("dd", null, a.template), h("dt", null, "State"), h("dd", null, labBadge(a))),
      a.reason ? h("p", { class: "muted", testid: "lab-reason" }, a.reason) : "",
      a.state === "active" && !a.busy
        ? h(
            "p",
            { class: "actions" },
            h("a", { class: "button", href: `#/desktop/${a.id}`, testid: "open-desktop" }, "Open desktop"),
            " ",
            h("a", { class: "button", href: `#/terminal/${a.id}`, testid: "open-terminal" }, "Open terminal"),
            " ",
            confirmButton({
              label: "Reset lab",
              confirmLabel: "Yes, erase my changes",
              testid: "reset-lab",
              onConfirm: async () => {
                try {
                  renderLab(await api.resetAllocation(a.id));
                } catch (err) {
                  showError(labError, err);
                }
              },
            }),
          )
        : "",
    );
  }

  async function loadLab(): Promise<void> {
    try {
      const { allocation } = await api.myAllocation();
      if (root.isConnected) renderLab(allocation);
    } catch (err) {
      if (root.isConnected) showError(labError, err);
    }
  }
  void loadLab();
  const labPoll = window.setInterval(() => {
    if (!root.isConnected) return window.clearInterval(labPoll);
    if (document.visibilityState === "visible") void loadLab();
  }, 3000);

  function tick(): void {
    if (!data) return;
    const now = Date.now();
    const start = new Date(data.event.starts_at).getTime();
    const end = new Date(data.event.ends_at).getTime();
    const state = data.event.state;
    let text: string;
    if (state === "ended" || state === "archived") text = "The event has ended.";
    else if (now < start) text = `Starts in ${formatDuration(start - now)}`;
    else if (now < end) text = `${state === "frozen" ? "Frozen — " : ""}Ends in ${formatDuration(end - now)}`;
    else text = "Scheduled end time has passed.";
    countdown.textContent = text;
  }

  function render(d: MeResponse): void {
    heading.textContent = d.event.name;
    document.title = `${d.event.name} · LabRack`;
    const mates = [...d.teammates].sort((a, b) => a.name.localeCompare(b.name));
    replace(
      body,
      h(
        "section",
        { class: "card", "aria-labelledby": "me-event-h" },
        h("h2", { id: "me-event-h", class: "visually-hidden" }, "Event"),
        h(
          "dl",
          { class: "facts" },
          h("dt", null, "Event"),
          h("dd", { testid: "me-event-name" }, d.event.name),
          h("dt", null, "State"),
          h("dd", null, stateBadge(d.event.state)),
          h("dt", null, "Starts"),
          h("dd", { testid: "me-starts" }, formatDateTime(d.event.starts_at)),
          h("dt", null, "Ends"),
          h("dd", { testid: "me-ends" }, formatDateTime(d.event.ends_at)),
          d.event.state === "draft" ? "" : h("dt", null, "Scores"),
          d.event.state === "draft" ? "" : h("dd", null, h("a", { href: `#/scoreboard/${encodeURIComponent(String(d.event.id))}`, testid: "me-scoreboard" }, "Scoreboard")),
        ),
        countdown,
      ),
      h(
        "section",
        { class: "card", "aria-labelledby": "me-team-h" },
        h("h2", { id: "me-team-h" }, "Team ", h("span", { class: "team-name", testid: "team-name" }, d.team.name)),
        h("p", null, "You are logged in as ", h("strong", { testid: "me-name" }, d.participant.name), "."),
        h("h3", null, "Teammates"),
        mates.length
          ? h(
              "ul",
              { class: "teammates", testid: "teammates" },
              mates.map((m) =>
                h(
                  "li",
                  { testid: "teammate", "data-joined": m.joined ? "yes" : "no" },
                  h("span", { testid: "teammate-name" }, m.name),
                  " ",
                  m.joined
                    ? h("span", { class: "joined-yes" }, "✓ joined")
                    : h("span", { class: "muted" }, "not joined yet"),
                ),
              ),
            )
          : h("p", { class: "muted", testid: "no-teammates" }, "No teammates yet."),
      ),
    );
    body.setAttribute("aria-busy", "false");
    tick();
  }

  async function load(): Promise<void> {
    try {
      data = await api.me();
      if (!root.isConnected) return;
      error.hidden = true;
      render(data);
    } catch (err) {
      if (!root.isConnected) return;
      showError(error, err);
      if (!data) replace(body);
    }
  }

  void load();
  const timer = window.setInterval(() => {
    if (!root.isConnected) {
      window.clearInterval(timer);
      return;
    }
    tick();
  }, 1000);
  const poll = window.setInterval(() => {
    if (!root.isConnected) {
      window.clearInterval(poll);
      return;
    }
    if (document.visibilityState === "visible") void load();
  }, REFRESH_MS);
}
