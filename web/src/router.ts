// Hash router with session-aware guards.
//   #/login  #/join  #/password  #/events  #/events/ID  #/events/ID/scoring  #/scoreboard/ID[/BRACKET] (public)
//   #/me  #/hosts  #/templates  #/terminal/ID  #/desktop/ID

import { h, replace } from "./dom";
import { renderHeader } from "./layout";
import { renderEvent } from "./pages/event";
import { renderEvents } from "./pages/events";
import { renderJoin } from "./pages/join";
import { renderHosts, renderTemplates } from "./pages/labs";
import { renderTerminal } from "./pages/terminal";
import { renderDesktop } from "./pages/desktop";
import { renderLogin } from "./pages/login";
import { renderMe } from "./pages/me";
import { renderPassword } from "./pages/password";
import { renderScoreboard } from "./pages/scoreboard";
import { renderScoring } from "./pages/scoring";
import { currentPrincipal, takeFlash } from "./session";

export type Route =
  | { name: "login" }
  | { name: "join" }
  | { name: "password" }
  | { name: "events" }
  | { name: "event"; id: string }
  | { name: "scoring"; id: string }
  | { name: "scoreboard"; id: string; bracket?: string }
  | { name: "me" }
  | { name: "hosts" }
  | { name: "templates" }
  | { name: "terminal"; id: string }
  | { name: "desktop"; id: string }
  | { name: "home" }
  | { name: "notfound"; path: string };

export function parseHash(hash: string): Route {
  const path = hash.replace(/^#/, "").split("?")[0].replace(/\/+$/, "");
  if (path === "" || path === "/") return { name: "home" };
  if (path === "/login") return { name: "login" };
  if (path === "/join") return { name: "join" };
  if (path === "/password") return { name: "password" };
  if (path === "/events") return { name: "events" };
  if (path === "/me") return { name: "me" };
  if (path === "/hosts") return { name: "hosts" };
  if (path === "/templates") return { name: "templates" };
  const sc = /^\/events\/([^/]+)\/scoring$/.exec(path);
  if (sc) return { name: "scoring", id: decodeURIComponent(sc[1]) };
  const sb = /^\/scoreboard\/([^/]+)(?:\/([^/]+))?$/.exec(path);
  if (sb) return { name: "scoreboard", id: decodeURIComponent(sb[1]), bracket: sb[2] ? decodeURIComponent(sb[2]) : undefined };
  const m = /^\/events\/([^/]+)$/.exec(path);
  if (m) return { name: "event", id: decodeURIComponent(m[1]) };
  const t = /^\/terminal\/([^/]+)$/.exec(path);
  if (t) return { name: "terminal", id: decodeURIComponent(t[1]) };
  const d = /^\/desktop\/([^/]+)$/.exec(path);
  if (d) return { name: "desktop", id: decodeURIComponent(d[1]) };
  return { name: "notfound", path };
}

/** Where the current principal should land by default. */
export function homeHash(): string {
  const p = currentPrincipal();
  if (!p) return "#/login";
  if (p.kind === "participant") return "#/me";
  return p.must_change_password ? "#/password" : "#/events";
}

/** Returns a hash to redirect to, or null if the route may be shown. */
function guard(route: Route): string | null {
  const p = currentPrincipal();
  if (route.name === "home") return homeHash();
  if (route.name === "notfound" || route.name === "scoreboard") return null;
  if (!p) {
    return route.name === "login" || route.name === "join" ? null : "#/login";
  }
  if (p.kind === "participant") {
    return route.name === "me" || route.name === "terminal" || route.name === "desktop" ? null : "#/me";
  }
  // staff
  if (p.must_change_password) return route.name === "password" ? null : "#/password";
  if (route.name === "login" || route.name === "join" || route.name === "me") return "#/events";
  return null;
}

let mainEl: HTMLElement;
let headerEl: HTMLElement;
let started = false;

export function startRouter(main: HTMLElement, header: HTMLElement): void {
  mainEl = main;
  headerEl = header;
  if (!started) {
    started = true;
    window.addEventListener("hashchange", () => render());
  }
  render();
}

/** Navigate to a hash route (re-renders even if it is the current one). */
export function navigate(hash: string): void {
  if (location.hash === hash) render();
  else location.hash = hash;
}

function render(): void {
  let route = parseHash(location.hash);
  for (let i = 0; i < 3; i++) {
    const redirect = guard(route);
    if (!redirect) break;
    history.replaceState(null, "", redirect);
    route = parseHash(redirect);
  }

  renderHeader(headerEl, route);

  // A fresh container per navigation: async work of the previous page writes into a detached node.
  const page = h("div", { class: `page page-${route.name}`, testid: `page-${route.name}` });
  const flash = takeFlash();
  if (flash) {
    page.append(
      h(
        "p",
        { class: flash.kind === "error" ? "flash flash-error" : "flash", role: flash.kind === "error" ? "alert" : "status", testid: "flash" },
        flash.text,
      ),
    );
  }

  switch (route.name) {
    case "login":
      renderLogin(page);
      break;
    case "join":
      renderJoin(page);
      break;
    case "password":
      renderPassword(page);
      break;
    case "events":
      renderEvents(page);
      break;
    case "event":
      renderEvent(page, route.id);
      break;
    case "me":
      renderMe(page);
      break;
    case "scoring":
      renderScoring(page, route.id);
      break;
    case "scoreboard":
      renderScoreboard(page, route.id, route.bracket);
      break;
    case "hosts":
      renderHosts(page);
      break;
    case "templates":
      renderTemplates(page);
      break;
    case "terminal":
      renderTerminal(page, route.id);
      break;
    case "desktop":
      renderDesktop(page, route.id);
      break;
    case "home":
      break;
    case "notfound":
      document.title = "Not found · LabRack";
      page.append(
        h("h1", { tabindex: -1 }, "Page not found"),
        h("p", null, "There is nothing at this address. ", h("a", { href: homeHash() }, "Go to the start page"), "."),
      );
      break;
  }
  replace(mainEl, page);
  const target = page.querySelector<HTMLElement>("[data-autofocus]") ?? page.querySelector<HTMLElement>("h1");
  target?.focus();
  window.scrollTo(0, 0);
}
