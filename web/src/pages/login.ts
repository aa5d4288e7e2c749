import { api } from "../api";
import { pageHeading } from "../components";
import { clearError, errorBox, field, h, showError, withBusy } from "../dom";
import { navigate } from "../router";
import { setSession } from "../session";

export function renderLogin(root: HTMLElement): void {
  const username = h("input", {
    type: "text",
    name: "username",
    autocomplete: "username",
    autocapitalize: "none",
    spellcheck: "false",
    required: true,
    testid: "login-username",
    "data-autofocus": true,
  });
  const password = h("input", {
    type: "password",
    name: "password",
    autocomplete: "current-password",
    required: true,
    testid: "login-password",
  });
  const submit = h("button", { type: "submit", testid: "login-submit" }, "Log in");
  const error = errorBox("login-error");
  const fields = { username, password };

  const form = h(
    "form",
    { class: "card narrow", testid: "login-form", novalidate: true },
    field("Username", username),
    field("Password", password),
    error,
    h("div", { class: "actions" }, submit),
  );

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearError(error, fields);
    if (!username.value.trim() || !password.value) {
      showError(error, new Error("Enter your username and password."));
      (username.value.trim() ? password : username).focus();
      return;
    }
    try {
      const auth = await withBusy(submit, "Logging in…", () => api.login(username.value.trim(), password.value));
      password.value = "";
      setSession(auth);
      const p = auth.principal;
      if (p.kind === "staff" && p.must_change_password) navigate("#/password");
      else if (p.kind === "staff") navigate("#/events");
      else navigate("#/me");
    } catch (err) {
      showError(error, err, fields);
      password.value = "";
      password.focus();
    }
  });

  root.append(
    h(
      "div",
      { class: "auth-page" },
      pageHeading("Staff login"),
      form,
      h(
        "p",
        { class: "alt-link" },
        h("a", { href: "#/join", testid: "join-link" }, "Participant? Join your team"),
      ),
      consoleCard(),
    ),
  );
}

/** How the staff console connects here: URL, the CA fingerprint it pins, and both as a QR code. */
function consoleCard(): HTMLElement {
  const card = h("section", { class: "card narrow console-card", testid: "console-card" });
  void api
    .appliance()
    .then((info) => {
      if (!info.ca_fingerprint) return;
      card.append(
        h("h2", {}, "Staff console"),
        h("p", { class: "muted" }, "Connect the LabRack console with this URL and CA fingerprint (compare it with what labrack serve printed)."),
        h("p", {}, h("strong", {}, "URL "), h("code", { testid: "appliance-url" }, info.url ?? location.origin)),
        h("p", {}, h("strong", {}, "CA fingerprint "), h("code", { class: "fingerprint", testid: "appliance-fingerprint" }, info.ca_fingerprint)),
      );
      if (info.qr_svg) {
        card.append(h("img", { src: `data:image/svg+xml;base64,${btoa(info.qr_svg)}`, alt: "QR code of the URL and CA fingerprint", width: "220", height: "220", testid: "appliance-qr" }));
      }
    })
    .catch(() => card.remove());
  return card;
}
