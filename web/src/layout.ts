// Site header: brand, navigation and who is logged in.

import { api } from "./api";
import { h, replace } from "./dom";
import type { Route } from "./router";
import { navigate } from "./router";
import { clearSession, currentPrincipal, setFlash } from "./session";

async function logout(button: HTMLButtonElement): Promise<void> {
  button.disabled = true;
  try {
    await api.logout();
  } catch {
    // Even if the server call fails, forget the session locally.
  }
  clearSession();
  setFlash("You have been logged out.");
  navigate("#/login");
}

export function renderHeader(header: HTMLElement, route: Route): void {
  const p = currentPrincipal();
  const nav: (HTMLElement | string)[] = [];
  const link = (href: string, label: string, testid: string, active: boolean): HTMLElement =>
    h("a", { href, testid, "aria-current": active ? "page" : null }, label);

  if (p?.kind === "staff" && !p.must_change_password) {
    nav.push(link("#/events", "Events", "nav-events", route.name === "events" || route.name === "event"));
    nav.push(link("#/hosts", "Lab hosts", "nav-hosts", route.name === "hosts"));
    nav.push(link("#/templates", "Templates", "nav-templates", route.name === "templates"));
    nav.push(link("#/password", "Change password", "nav-password", route.name === "password"));
  }

  let who: HTMLElement | string = "";
  if (p) {
    const logoutBtn = h("button", { type: "button", class: "link-button", testid: "logout" }, "Log out");
    logoutBtn.addEventListener("click", () => void logout(logoutBtn));
    who = h(
      "div",
      { class: "who" },
      h(
        "span",
        { testid: "whoami" },
        p.kind === "staff"
          ? [h("strong", null, p.username), " ", h("span", { class: "role", testid: "whoami-role" }, p.role)]
          : [h("strong", null, p.name), " ", h("span", { class: "role" }, "participant")],
      ),
      logoutBtn,
    );
  }

  replace(
    header,
    h(
      "div",
      { class: "header-inner" },
      h("a", { class: "brand", href: "#/", testid: "brand" }, "LabRack"),
      nav.length ? h("nav", { "aria-label": "Main" }, nav) : "",
      who,
    ),
  );
}
