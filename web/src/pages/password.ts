import { api } from "../api";
import { pageHeading } from "../components";
import { clearError, errorBox, field, h, showError, withBusy } from "../dom";
import { navigate } from "../router";
import { currentStaff, setFlash, setSession } from "../session";

export const MIN_PASSWORD_LENGTH = 12;

export function renderPassword(root: HTMLElement): void {
  const staff = currentStaff();
  const forced = !!staff?.must_change_password;

  const current = h("input", {
    type: "password",
    name: "current_password",
    autocomplete: "current-password",
    required: true,
    testid: "current-password",
    "data-autofocus": true,
  });
  const next = h("input", {
    type: "password",
    name: "new_password",
    autocomplete: "new-password",
    required: true,
    minlength: MIN_PASSWORD_LENGTH,
    testid: "new-password",
  });
  const confirm = h("input", {
    type: "password",
    name: "confirm_password",
    autocomplete: "new-password",
    required: true,
    testid: "confirm-password",
  });
  const submit = h("button", { type: "submit", testid: "password-submit" }, "Change password");
  const error = errorBox("password-error");
  const fields = { current_password: current, new_password: next, confirm_password: confirm };

  const form = h(
    "form",
    { class: "card narrow", testid: "password-form", novalidate: true },
    field(forced ? "One-time / current password" : "Current password", current),
    field("New password", next, `At least ${MIN_PASSWORD_LENGTH} characters.`),
    field("Repeat new password", confirm),
    error,
    h("div", { class: "actions" }, submit),
  );

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearError(error, fields);
    if (!current.value) {
      showError(error, new Error("Enter your current password."));
      current.focus();
      return;
    }
    if (next.value.length < MIN_PASSWORD_LENGTH) {
      showError(error, new Error(`The new password must be at least ${MIN_PASSWORD_LENGTH} characters long.`));
      next.setAttribute("aria-invalid", "true");
      next.focus();
      return;
    }
    if (next.value !== confirm.value) {
      showError(error, new Error("The two new passwords do not match."));
      confirm.setAttribute("aria-invalid", "true");
      confirm.focus();
      return;
    }
    try {
      const auth = await withBusy(submit, "Saving…", () => api.changePassword(current.value, next.value));
      current.value = next.value = confirm.value = "";
      setSession(auth);
      setFlash("Your password has been changed.");
      navigate(auth.principal.kind === "participant" ? "#/me" : "#/events");
    } catch (err) {
      showError(error, err, fields);
    }
  });

  root.append(
    h(
      "div",
      { class: "auth-page" },
      pageHeading(forced ? "Choose a new password" : "Change password"),
      forced
        ? h(
            "p",
            { class: "notice", testid: "must-change-notice" },
            "You logged in with a one-time password. Choose a new password before continuing.",
          )
        : "",
      form,
    ),
  );
}
