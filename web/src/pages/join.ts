import { api } from "../api";
import { pageHeading } from "../components";
import { clearError, errorBox, field, h, showError, withBusy } from "../dom";
import { navigate } from "../router";
import { setSession } from "../session";

export function renderJoin(root: HTMLElement): void {
  const codeAttrs = {
    type: "text",
    autocomplete: "off",
    autocapitalize: "characters",
    autocorrect: "off",
    spellcheck: "false",
    required: true,
    class: "mono code-input",
  };
  const eventCode = h("input", { ...codeAttrs, name: "event_code", testid: "join-event-code", "data-autofocus": true });
  const joinCode = h("input", { ...codeAttrs, name: "join_code", testid: "join-code-input" });
  const submit = h("button", { type: "submit", testid: "join-submit" }, "Join");
  const error = errorBox("join-error");
  const fields = { event_code: eventCode, join_code: joinCode };

  const form = h(
    "form",
    { class: "card narrow", testid: "join-form", novalidate: true },
    field("Event code", eventCode, "Shown by the organizers, e.g. on the screen at the venue."),
    field("Your personal join code", joinCode, "From the slip you were handed by the staff."),
    error,
    h("div", { class: "actions" }, submit),
  );

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearError(error, fields);
    const ec = eventCode.value.trim();
    const jc = joinCode.value.trim();
    if (!ec || !jc) {
      showError(error, new Error("Enter both the event code and your personal join code."));
      (ec ? joinCode : eventCode).focus();
      return;
    }
    try {
      const auth = await withBusy(submit, "Joining…", () => api.join(ec, jc));
      joinCode.value = "";
      setSession(auth);
      navigate(auth.principal.kind === "participant" ? "#/me" : "#/events");
    } catch (err) {
      showError(error, err, fields);
    }
  });

  root.append(
    h(
      "div",
      { class: "auth-page" },
      pageHeading("Join your team"),
      form,
      h("p", { class: "alt-link" }, h("a", { href: "#/login", testid: "login-link" }, "Staff? Log in here")),
    ),
  );
}
