// Tiny DOM helpers: element builder, form fields, error boxes.

import { ApiError } from "./api";

export type Child = Node | string | number | null | undefined | false | Child[];
type Listener = (ev: any) => void;
export type Attrs = Record<string, string | number | boolean | null | undefined | Listener>;

/** Create an element. `testid` becomes `data-testid`; `onX` keys become event listeners. */
export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs?: Attrs | null,
  ...children: Child[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  if (attrs) {
    for (const [key, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (typeof value === "function") {
        el.addEventListener(key.slice(2).toLowerCase(), value);
      } else if (key === "testid") {
        el.setAttribute("data-testid", String(value));
      } else if (key === "value" && "value" in el) {
        (el as unknown as { value: string }).value = String(value);
      } else if (value === true) {
        el.setAttribute(key, "");
      } else {
        el.setAttribute(key, String(value));
      }
    }
  }
  append(el, children);
  return el;
}

export function append(parent: Node, children: Child[]): void {
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    if (Array.isArray(c)) append(parent, c);
    else if (c instanceof Node) parent.appendChild(c);
    else parent.appendChild(document.createTextNode(String(c)));
  }
}

/** Replace all children of `el`. */
export function replace(el: Element, ...children: Child[]): void {
  el.replaceChildren();
  append(el, children);
}

let idCounter = 0;
export function uid(prefix = "f"): string {
  idCounter += 1;
  return `${prefix}-${idCounter}`;
}

/** A labelled form field wrapping an input/select/textarea (assigns an id if needed). */
export function field(
  label: string,
  control: HTMLInputElement | HTMLSelectElement | HTMLTextAreaElement,
  hint?: string,
): HTMLDivElement {
  if (!control.id) control.id = uid("in");
  const children: Child[] = [h("label", { for: control.id }, label)];
  if (hint) {
    const hintId = uid("hint");
    control.setAttribute("aria-describedby", hintId);
    children.push(h("p", { class: "hint", id: hintId }, hint));
  }
  children.push(control);
  return h("div", { class: "field" }, children);
}

/** A hidden alert region; use `showError` / `clearError` to fill it. */
export function errorBox(testid: string): HTMLDivElement {
  const box = h("div", { class: "error-box", role: "alert", testid, hidden: true });
  box.id = uid("err");
  return box;
}

/** Human-readable label for a problem's `field` (falls back to the raw name). */
function fieldLabel(name: string, fields?: Record<string, HTMLElement>): string {
  const control = fields?.[name];
  if (control?.id) {
    const label = document.querySelector(`label[for="${control.id}"]`);
    if (label?.textContent) return label.textContent;
  }
  return name;
}

/**
 * Show an error (ApiError problem details, or any Error/string) in `box`.
 * If the problem names a `field` present in `fields`, the control is marked invalid and focused.
 */
export function showError(
  box: HTMLElement,
  err: unknown,
  fields?: Record<string, HTMLElement>,
): void {
  clearInvalid(fields);
  const parts: Child[] = [];
  if (err instanceof ApiError) {
    const p = err.problem;
    const title = p.title && p.detail && p.title !== p.detail ? p.title : null;
    if (title) parts.push(h("strong", { class: "error-title" }, title), " ");
    parts.push(h("span", { class: "error-detail", testid: "error-detail" }, err.message));
    if (p.field) {
      parts.push(
        h("span", { class: "error-field", testid: "error-field" }, ` (field: ${fieldLabel(p.field, fields)})`),
      );
      const control = fields?.[p.field];
      if (control) {
        control.setAttribute("aria-invalid", "true");
        control.setAttribute("aria-errormessage", box.id);
        control.focus();
      }
    }
  } else if (err instanceof Error) {
    parts.push(h("span", { class: "error-detail", testid: "error-detail" }, err.message));
  } else {
    parts.push(h("span", { class: "error-detail", testid: "error-detail" }, String(err)));
  }
  replace(box, parts);
  box.hidden = false;
}

function clearInvalid(fields?: Record<string, HTMLElement>): void {
  if (!fields) return;
  for (const c of Object.values(fields)) {
    c.removeAttribute("aria-invalid");
    c.removeAttribute("aria-errormessage");
  }
}

export function clearError(box: HTMLElement, fields?: Record<string, HTMLElement>): void {
  clearInvalid(fields);
  box.replaceChildren();
  box.hidden = true;
}

/** A polite status line for success messages. */
export function statusLine(testid: string): HTMLParagraphElement {
  return h("p", { class: "status", role: "status", testid });
}

/**
 * Run `action` while the form's submit button is disabled and shows `busyLabel`.
 * Prevents double submits.
 */
export async function withBusy<T>(
  button: HTMLButtonElement,
  busyLabel: string,
  action: () => Promise<T>,
): Promise<T> {
  const label = button.textContent;
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  button.textContent = busyLabel;
  try {
    return await action();
  } finally {
    button.disabled = false;
    button.removeAttribute("aria-busy");
    button.textContent = label;
  }
}

/**
 * A button that asks for confirmation inline (no native dialogs): the first click
 * reveals "confirm" and "cancel" buttons.
 */
export function confirmButton(opts: {
  label: string;
  confirmLabel: string;
  testid: string;
  className?: string;
  onConfirm: () => Promise<void> | void;
}): HTMLSpanElement {
  const wrap = h("span", { class: "confirm-wrap" });
  const renderIdle = (): void => {
    const btn = h(
      "button",
      { type: "button", class: opts.className ?? "secondary", testid: opts.testid },
      opts.label,
    );
    btn.addEventListener("click", () => renderConfirm());
    replace(wrap, btn);
  };
  const renderConfirm = (): void => {
    const yes = h(
      "button",
      { type: "button", class: "danger", testid: `${opts.testid}-confirm` },
      opts.confirmLabel,
    );
    const no = h("button", { type: "button", class: "link-button", testid: `${opts.testid}-cancel` }, "Cancel");
    yes.addEventListener("click", async () => {
      yes.disabled = true;
      no.disabled = true;
      try {
        await opts.onConfirm();
      } finally {
        if (wrap.isConnected) renderIdle();
      }
    });
    no.addEventListener("click", () => renderIdle());
    replace(wrap, yes, " ", no);
    yes.focus();
  };
  renderIdle();
  return wrap;
}

/** A table inside a horizontally scrollable wrapper. */
export function table(opts: {
  caption: string;
  headers: string[];
  rows: HTMLTableRowElement[];
  testid: string;
  captionHidden?: boolean;
}): HTMLDivElement {
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      { testid: opts.testid },
      h("caption", { class: opts.captionHidden ? "visually-hidden" : null }, opts.caption),
      h("thead", null, h("tr", null, opts.headers.map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", null, opts.rows),
    ),
  );
}
