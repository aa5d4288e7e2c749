// In-memory session state (principal + CSRF token). Nothing is persisted in the browser.

import { AuthResponse, Principal, StaffPrincipal, StaffRole, setCsrfToken } from "./api";

let principal: Principal | null = null;
const listeners = new Set<() => void>();

export function currentPrincipal(): Principal | null {
  return principal;
}

export function currentStaff(): StaffPrincipal | null {
  return principal && principal.kind === "staff" ? principal : null;
}

export function setSession(auth: AuthResponse): void {
  principal = auth.principal;
  setCsrfToken(auth.csrf_token);
  listeners.forEach((fn) => fn());
}

export function clearSession(): void {
  principal = null;
  setCsrfToken(null);
  listeners.forEach((fn) => fn());
}

export function onSessionChange(fn: () => void): void {
  listeners.add(fn);
}

/** admin and organizer: create events, edit them, change state. */
export function canManageEvents(role: StaffRole | undefined): boolean {
  return role === "admin" || role === "organizer";
}

/** admin, organizer and staff: create teams/participants, import, regenerate codes. Judges are read-only. */
export function canManageParticipants(role: StaffRole | undefined): boolean {
  return role === "admin" || role === "organizer" || role === "staff";
}

// One-shot message shown on the next rendered page (e.g. "session expired").
let flash: { text: string; kind: "info" | "error" } | null = null;

export function setFlash(text: string, kind: "info" | "error" = "info"): void {
  flash = { text, kind };
}

export function takeFlash(): { text: string; kind: "info" | "error" } | null {
  const f = flash;
  flash = null;
  return f;
}
