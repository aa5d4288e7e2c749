// Entry point: recover the session (cookie → CSRF token), then start the router.

import { api, ApiError, setUnauthorizedHandler } from "./api";
import { h } from "./dom";
import { navigate, startRouter } from "./router";
import { clearSession, currentPrincipal, setFlash, setSession } from "./session";

async function boot(): Promise<void> {
  const header = document.getElementById("site-header");
  const main = document.getElementById("main");
  if (!header || !main) throw new Error("index.html is missing #site-header or #main");

  // The skip link must not change the hash (that would be routed); just move focus.
  document.getElementById("skip-link")?.addEventListener("click", (ev) => {
    ev.preventDefault();
    main.focus();
  });

  setUnauthorizedHandler(() => {
    if (!currentPrincipal()) return;
    clearSession();
    setFlash("Your session has ended. Please log in again.", "error");
    navigate("#/login");
  });

  try {
    setSession(await api.session());
  } catch (err) {
    if (!(err instanceof ApiError) || err.status !== 401) {
      // Server unreachable or broken: still show the login page, but say why.
      setFlash(`Could not check your session: ${err instanceof Error ? err.message : String(err)}`, "error");
    }
  }
  startRouter(main, header);
  document.documentElement.dataset.ready = "true";
}

boot().catch((err) => {
  const main = document.getElementById("main");
  main?.replaceChildren(
    h("p", { class: "flash flash-error", role: "alert" }, `LabRack failed to start: ${err instanceof Error ? err.message : String(err)}`),
  );
});
