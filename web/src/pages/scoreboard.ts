// The venue's projector: the public scoreboard, full screen, live over server-sent events
// (no login; during a freeze it shows the board as it was when the freeze began).

import { api, BoardRow, Leaderboard, PublicBoard } from "../api";
import { errorBox, h, replace, showError, table } from "../dom";

/** The ranked rows of a board as a table (shared with the staff page). */
export function boardTable(board: Leaderboard, testid: string, caption: string): HTMLElement {
  const rows = board.rows.map((row: BoardRow) =>
    h(
      "tr",
      { testid: "board-row", "data-team-id": String(row.team_id) },
      h("td", { class: "rank", testid: "board-rank" }, String(row.rank)),
      h("td", { class: "team", testid: "board-team" }, row.team),
      ...board.dimensions.map((d) => h("td", { class: "num" }, (row.dimensions[d] ?? 0).toString())),
      h("td", { class: "num" }, row.adjustments ? row.adjustments.toString() : ""),
      h("td", { class: "num total", testid: "board-total" }, row.total.toString()),
    ),
  );
  return table({ caption, captionHidden: true, headers: ["#", "Team", ...board.dimensions, "Hints ±", "Total"], rows, testid });
}

export function renderScoreboard(root: HTMLElement, eventId: string, bracket?: string): void {
  document.title = "Scoreboard · LabRack";
  root.classList.add("projector");
  const heading = h("h1", { tabindex: -1, testid: "page-title" }, "Scoreboard");
  const banner = h("p", { class: "frozen-banner", testid: "frozen-banner", hidden: true });
  const live = h("span", { class: "muted live-state", testid: "live-state", "aria-live": "polite" }, "Connecting…");
  const error = errorBox("scoreboard-error");
  const body = h("div", { testid: "scoreboard-body" });
  const full = h("button", { type: "button", class: "secondary no-print", testid: "full-screen" }, "Full screen");
  full.addEventListener("click", () => void document.documentElement.requestFullscreen?.().catch(() => undefined));
  root.append(heading, banner, error, body, h("p", { class: "live-line" }, live, " ", full));

  const show = (data: PublicBoard): void => {
    heading.textContent = bracket ? `${data.event} — ${bracket}` : data.event;
    document.title = `${data.event} · Scoreboard`;
    banner.hidden = !data.frozen_at;
    banner.textContent = data.frozen_at ? `The board is frozen since ${new Date(data.frozen_at).toLocaleTimeString()}: final results at the end.` : "";
    replace(body, boardTable(data.board, "scoreboard-table", "Scores"));
    error.hidden = true;
  };

  // EventSource reconnects by itself after a drop; the state line says so.
  const query = bracket ? `?bracket=${encodeURIComponent(bracket)}` : "";
  const source = new EventSource(`/api/v1/events/${encodeURIComponent(eventId)}/scoreboard/stream${query}`);
  source.addEventListener("board", (event) => {
    if (!root.isConnected) return source.close();
    show(JSON.parse((event as MessageEvent<string>).data) as PublicBoard);
    live.textContent = `Live · updated ${new Date().toLocaleTimeString()}`;
  });
  source.addEventListener("error", () => {
    if (!root.isConnected) return source.close();
    live.textContent = "Connection lost: reconnecting…";
    // A draft or unknown event answers a problem, not a stream: say why once.
    api.scoreboard(eventId, bracket).then(show).catch((err) => showError(error, err));
  });
  const watch = window.setInterval(() => {
    if (!root.isConnected) {
      source.close();
      window.clearInterval(watch);
    }
  }, 1000);
}
