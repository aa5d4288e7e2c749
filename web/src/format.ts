// Date/time helpers, state labels and the words on transition buttons.

import { EventState } from "./api";

const dateTimeFmt = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });

export function formatDateTime(iso: string | null | undefined): string {
  if (!iso) return "—";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : dateTimeFmt.format(d);
}

export function formatRange(startIso: string, endIso: string): string {
  return `${formatDateTime(startIso)} – ${formatDateTime(endIso)}`;
}

function pad(n: number): string {
  return String(n).padStart(2, "0");
}

/** Value for an `<input type="datetime-local">` (browser local time) from an RFC 3339 string. */
export function toLocalInputValue(iso: string | Date): string {
  const d = typeof iso === "string" ? new Date(iso) : iso;
  if (Number.isNaN(d.getTime())) return "";
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

/**
 * Convert a `datetime-local` value (interpreted in the browser's local time zone)
 * to an RFC 3339 UTC string without fractional seconds, e.g. `2026-12-01T09:00:00Z`.
 * Returns null for empty/invalid input.
 */
export function localInputToRfc3339(value: string): string | null {
  const m = /^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})(?::(\d{2}))?/.exec(value.trim());
  if (!m) return null;
  const d = new Date(+m[1], +m[2] - 1, +m[3], +m[4], +m[5], m[6] ? +m[6] : 0);
  if (Number.isNaN(d.getTime())) return null;
  return d.toISOString().replace(/\.\d{3}Z$/, "Z");
}

/** "2d 3h 4m 5s" style duration. */
export function formatDuration(ms: number): string {
  const total = Math.max(0, Math.floor(ms / 1000));
  const days = Math.floor(total / 86400);
  const hours = Math.floor((total % 86400) / 3600);
  const mins = Math.floor((total % 3600) / 60);
  const secs = total % 60;
  const parts: string[] = [];
  if (days) parts.push(`${days}d`);
  if (days || hours) parts.push(`${hours}h`);
  if (days || hours || mins) parts.push(`${mins}m`);
  parts.push(`${secs}s`);
  return parts.join(" ");
}

export const STATE_LABELS: Record<EventState, string> = {
  draft: "Draft",
  live: "Live",
  frozen: "Frozen",
  ended: "Ended",
  archived: "Archived",
};

/**
 * The button that moves an event from `from` to `to`. Which moves are legal is the server's
 * business: it sends them as the event's `next_states`.
 */
export function transitionButton(from: EventState, to: EventState): { label: string; confirm?: string } {
  switch (to) {
    case "live":
      return { label: from === "frozen" ? "Unfreeze (go live)" : "Go live" };
    case "frozen":
      return { label: "Freeze" };
    case "ended":
      return { label: "End event", confirm: "Yes, end the event" };
    case "archived":
      return { label: "Archive", confirm: "Yes, archive it" };
    default:
      return { label: STATE_LABELS[to] ?? to };
  }
}
