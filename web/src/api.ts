// Typed client for the LabRack JSON API (same origin, cookie session + CSRF header). The
// types are the server's: generated from its OpenAPI document (`cargo xtask web`) into
// ./generated/schema.ts; the names below are the UI's words for them.

import type { components } from "./generated/schema";

type Schemas = components["schemas"];

export type StaffRole = Schemas["Role"];

export type StaffPrincipal = Extract<Principal, { kind: "staff" }>;

export type ParticipantPrincipal = Extract<Principal, { kind: "participant" }>;

export type Principal = Schemas["Principal"];

export type AuthResponse = Schemas["SessionInfo"];

export type EventState = Schemas["EventState"];

export type LabEvent = Schemas["Event"];

export type Team = Schemas["Team"];

export type Participant = Schemas["Participant"];

export type IssuedJoinCode = Schemas["IssuedCode"];

export type ImportResult = Schemas["ImportResult"];

export type MeResponse = Schemas["Me"];

export type AllocationState =
  | "requested"
  | "provisioning"
  | "active"
  | "releasing"
  | "released"
  | "failed"
  | "release_failed"
  | "unreachable";

/** The server documents `state` as text; these are its values. */
export type Allocation = Omit<Schemas["AllocationView"], "state"> & { state: AllocationState };

export interface GpuDevice {
  index: number;
  name: string;
  utilization_percent: number | null;
  memory_total_bytes: number | null;
  memory_used_bytes: number | null;
  temperature_celsius: number | null;
  power_watts: number | null;
}

export interface Telemetry {
  cpu_percent: number;
  cpu_count: number;
  memory_total_bytes: number;
  memory_used_bytes: number;
  gpus: { status: "no_gpu"; reason: string } | { status: "present"; driver_version: string | null; devices: GpuDevice[] };
}

/** The server passes the host's telemetry through as the host sent it (free JSON). */
export type LabHost = Omit<Schemas["HostView"], "telemetry"> & { telemetry: Telemetry | null };

export type LabTemplate = Schemas["TemplateView"];

export type BoardRow = Schemas["BoardRow"];

export type Leaderboard = Schemas["Leaderboard"];

export type PublicBoard = Schemas["PublicBoard"];

export type MyCheck = Schemas["MyCheck"];

export type MyChecks = Schemas["MyChecks"];

export type Submission = Schemas["Submission"];

export type Hint = Schemas["HintView"];

export type AgentMessage = Schemas["AgentMessage"];

export type BatchQueued = Schemas["BatchQueued"];

export type BatchView = Schemas["BatchView"];

export type Job = Schemas["Job"];

export type Rubric = Schemas["Rubric"];

export type Alert = Schemas["Alert"];

export type LedgerEntry = Schemas["LedgerEntry"];

export type LedgerView = Schemas["LedgerView"];

export type SyncView = Schemas["SyncView"];

export type RowError = Schemas["RowError"];

export type Problem = Schemas["Problem"];

export class ApiError extends Error {
  readonly status: number;
  readonly problem: Problem;
  constructor(status: number, problem: Problem) {
    super(problem.detail || problem.title || `Request failed (HTTP ${status})`);
    this.name = "ApiError";
    this.status = status;
    this.problem = problem;
  }
}

// The CSRF token lives only in memory (never in storage or URLs).
let csrfToken: string | null = null;

export function setCsrfToken(token: string | null): void {
  csrfToken = token;
}

/** Called when an authenticated request answers 401 (session expired / logged out elsewhere). */
let onUnauthorized: (() => void) | null = null;
export function setUnauthorizedHandler(fn: () => void): void {
  onUnauthorized = fn;
}

interface RequestOptions {
  /** Send a raw CSV body instead of JSON. */
  csv?: string;
  /** Send a raw TOML body instead of JSON. */
  toml?: string;
  /** JSON body. */
  json?: unknown;
  /** If false, a 401 is returned to the caller without triggering the global handler. */
  sessionRequired?: boolean;
}

async function readProblem(res: Response): Promise<Problem> {
  const type = res.headers.get("content-type") ?? "";
  try {
    if (type.includes("json")) {
      const body = (await res.json()) as unknown;
      if (body && typeof body === "object") return body as Problem;
    } else {
      const text = (await res.text()).trim();
      if (text) return { type: "about:blank", status: res.status, title: res.statusText, detail: text.slice(0, 500) };
    }
  } catch {
    // fall through to the generic problem
  }
  return { type: "about:blank", status: res.status, title: res.statusText || `HTTP ${res.status}`, detail: "" };
}

export async function request<T>(method: string, path: string, opts: RequestOptions = {}): Promise<T> {
  const headers: Record<string, string> = {
    Accept: "application/json, application/problem+json",
  };
  let body: string | undefined;
  if (opts.csv !== undefined) {
    headers["Content-Type"] = "text/csv";
    body = opts.csv;
  } else if (opts.toml !== undefined) {
    headers["Content-Type"] = "application/toml";
    body = opts.toml;
  } else if (opts.json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(opts.json);
  }
  if (method !== "GET" && method !== "HEAD" && csrfToken) {
    headers["X-CSRF-Token"] = csrfToken;
  }

  let res: Response;
  try {
    res = await fetch(path, { method, headers, body, credentials: "same-origin", cache: "no-store" });
  } catch {
    throw new ApiError(0, {
      type: "urn:labrack:problem:network",
      status: 0,
      title: "Network error",
      detail: "Could not reach the LabRack server. Check your connection and try again.",
    });
  }

  if (!res.ok) {
    const problem = await readProblem(res);
    if (res.status === 401 && opts.sessionRequired !== false && onUnauthorized) {
      onUnauthorized();
    }
    if (res.status === 429 && !problem.detail) {
      const retry = res.headers.get("retry-after");
      problem.detail = retry
        ? `Too many attempts. Try again in ${retry} seconds.`
        : "Too many attempts. Please wait a moment and try again.";
    }
    throw new ApiError(res.status, problem);
  }
  if (res.status === 204) return undefined as T;
  const text = await res.text();
  return (text ? JSON.parse(text) : undefined) as T;
}

type Id = string | number;
const enc = (id: Id): string => encodeURIComponent(String(id));

export type ApplianceCard = Schemas["ApplianceCard"];

export const api = {
  appliance: () => request<ApplianceCard>("GET", "/api/v1/appliance", { sessionRequired: false }),
  // --- auth ---
  session: () => request<AuthResponse>("GET", "/api/v1/auth/session", { sessionRequired: false }),
  login: (username: string, password: string) =>
    request<AuthResponse>("POST", "/api/v1/auth/login", {
      json: { username, password },
      sessionRequired: false,
    }),
  logout: () => request<void>("POST", "/api/v1/auth/logout", { sessionRequired: false }),
  changePassword: (current_password: string, new_password: string) =>
    request<AuthResponse>("POST", "/api/v1/auth/password", {
      json: { current_password, new_password },
      sessionRequired: false,
    }),
  join: (event_code: string, join_code: string) =>
    request<AuthResponse>("POST", "/api/v1/join", {
      json: { event_code, join_code },
      sessionRequired: false,
    }),

  // --- events ---
  listEvents: () => request<{ events: LabEvent[] }>("GET", "/api/v1/events"),
  createEvent: (body: { name: string; starts_at: string; ends_at: string }) =>
    request<LabEvent>("POST", "/api/v1/events", { json: body }),
  getEvent: (id: Id) => request<LabEvent>("GET", `/api/v1/events/${enc(id)}`),
  updateEvent: (id: Id, body: { name?: string; starts_at?: string; ends_at?: string }) =>
    request<LabEvent>("PATCH", `/api/v1/events/${enc(id)}`, { json: body }),
  transition: (id: Id, to: EventState, from?: EventState) =>
    request<LabEvent>("POST", `/api/v1/events/${enc(id)}/transition`, { json: { to, from } }),

  // --- teams & participants ---
  listTeams: (eventId: Id) => request<{ teams: Team[] }>("GET", `/api/v1/events/${enc(eventId)}/teams`),
  createTeam: (eventId: Id, name: string) =>
    request<Team>("POST", `/api/v1/events/${enc(eventId)}/teams`, { json: { name } }),
  getTeam: (teamId: Id) =>
    request<{ team: Team; participants: Participant[] }>("GET", `/api/v1/teams/${enc(teamId)}`),
  listParticipants: (eventId: Id) =>
    request<{ participants: Participant[] }>("GET", `/api/v1/events/${enc(eventId)}/participants`),
  createParticipant: (eventId: Id, body: { team_id: Id; name: string; email?: string }) =>
    request<IssuedJoinCode>("POST", `/api/v1/events/${enc(eventId)}/participants`, { json: body }),
  regenerateJoinCode: (participantId: Id) =>
    request<IssuedJoinCode>("POST", `/api/v1/participants/${enc(participantId)}/join-code`),
  importCsv: (eventId: Id, csv: string) =>
    request<ImportResult>("POST", `/api/v1/events/${enc(eventId)}/participants/import`, { csv }),

  // --- participant ---
  me: () => request<MeResponse>("GET", "/api/v1/me"),
  myAllocation: () => request<{ allocation: Allocation | null }>("GET", "/api/v1/me/allocation"),

  // --- lab hosts, templates, allocations ---
  listHosts: () => request<{ hosts: LabHost[]; heartbeat_secs: number }>("GET", "/api/v1/hosts"),
  createEnrolmentToken: (body: { ttl_secs?: number; note?: string }) =>
    request<{ token: string; expires_at: string }>("POST", "/api/v1/hosts/enrolment-tokens", { json: body }),
  listTemplates: () =>
    request<{ templates: LabTemplate[]; source: string; updated_at: string | null }>("GET", "/api/v1/templates"),
  putTemplates: (toml: string) =>
    request<{ templates: LabTemplate[]; source: string; updated_at: string | null }>("PUT", "/api/v1/templates", { toml }),
  listAllocations: (eventId: Id) =>
    request<{ allocations: Allocation[] }>("GET", `/api/v1/events/${enc(eventId)}/allocations`),
  allocate: (teamId: Id, template: string) =>
    request<Allocation>("POST", `/api/v1/teams/${enc(teamId)}/allocation`, { json: { template } }),
  getAllocation: (id: Id) => request<Allocation>("GET", `/api/v1/allocations/${enc(id)}`),
  resetAllocation: (id: Id) => request<Allocation>("POST", `/api/v1/allocations/${enc(id)}/reset`),
  releaseAllocation: (id: Id) => request<Allocation>("POST", `/api/v1/allocations/${enc(id)}/release`),
  resumeAllocation: (id: Id) => request<Allocation>("POST", `/api/v1/allocations/${enc(id)}/resume`),
  forceReleaseAllocation: (id: Id) => request<Allocation>("POST", `/api/v1/allocations/${enc(id)}/force-release`),
  desktopTicket: (id: Id) =>
    request<{ ticket: string; mode: "interactive" | "view"; expires_in_secs: number; path: string }>("POST", `/api/v1/allocations/${enc(id)}/desktop-ticket`),
  // --- checks, scores, hints, agents ---
  myChecks: () => request<MyChecks>("GET", "/api/v1/me/checks"),
  runMyChecks: () => request<BatchQueued>("POST", "/api/v1/me/checks/run"),
  mySubmissions: () => request<Submission[]>("GET", "/api/v1/me/submissions"),
  submit: (version: string, note?: string) => request<Submission>("POST", "/api/v1/me/submissions", { json: { version, note: note || undefined } }),
  myHints: () => request<Hint[]>("GET", "/api/v1/me/hints"),
  unlockHint: (id: Id) => request<Hint>("POST", `/api/v1/me/hints/${enc(id)}/unlock`),
  ask: (question: string) => request<{ job_id: number }>("POST", "/api/v1/me/assistant", { json: { question } }),
  myMessages: () =>
    request<{ messages: AgentMessage[]; model_configured: boolean; token_budget: number; tokens_used: number }>("GET", "/api/v1/me/messages"),
  leaderboard: (eventId: Id, bracket?: string) =>
    request<Leaderboard>("GET", `/api/v1/events/${enc(eventId)}/leaderboard${bracket ? `?bracket=${encodeURIComponent(bracket)}` : ""}`),
  scoreboard: (eventId: Id, bracket?: string) =>
    request<PublicBoard>("GET", `/api/v1/events/${enc(eventId)}/scoreboard${bracket ? `?bracket=${encodeURIComponent(bracket)}` : ""}`, { sessionRequired: false }),
  getRubric: (eventId: Id) => request<Rubric>("GET", `/api/v1/events/${enc(eventId)}/rubric`),
  putRubric: (eventId: Id, toml: string) => request<Rubric>("PUT", `/api/v1/events/${enc(eventId)}/rubric`, { toml }),
  judge: (teamId: Id, scores: Record<string, number>, comment?: string) =>
    request<unknown>("POST", `/api/v1/teams/${enc(teamId)}/judge-scores`, { json: { scores, comment: comment || undefined } }),
  queueChecks: (eventId: Id, body: { team_id?: number; check?: string; reason?: string }) =>
    request<BatchQueued>("POST", `/api/v1/events/${enc(eventId)}/check-batches`, { json: body }),
  getBatch: (batchId: Id) => request<BatchView>("GET", `/api/v1/check-batches/${enc(batchId)}`),
  listJobs: (state: string) => request<{ jobs: Job[] }>("GET", `/api/v1/jobs?state=${encodeURIComponent(state)}&limit=100`),
  requeueJob: (id: Id) => request<Job>("POST", `/api/v1/jobs/${enc(id)}/requeue`),
  createHint: (eventId: Id, body: { title: string; body: string; cost: number }) =>
    request<Hint>("POST", `/api/v1/events/${enc(eventId)}/hints`, { json: body }),
  listHints: (eventId: Id) => request<Hint[]>("GET", `/api/v1/events/${enc(eventId)}/hints`),
  ledger: (eventId: Id) => request<LedgerView>("GET", `/api/v1/events/${enc(eventId)}/ledger`),
  addLedgerEntry: (eventId: Id, body: { kind: "credit" | "correction"; amount_cents: number; note: string; team_id?: number }) =>
    request<LedgerView>("POST", `/api/v1/events/${enc(eventId)}/ledger`, { json: body }),
  syncStatus: () => request<SyncView>("GET", "/api/v1/sync"),
  myAnnouncements: () => request<{ id: number; text: string; author: string; at: string }[]>("GET", "/api/v1/me/announcements"),
  alerts: (eventId: Id) => request<Alert[]>("GET", `/api/v1/events/${enc(eventId)}/alerts`),
  terminalTicket: (id: Id) =>
    request<{ ticket: string; expires_in_secs: number; path: string }>("POST", `/api/v1/allocations/${enc(id)}/terminal-ticket`),
};
