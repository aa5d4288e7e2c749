// Typed client for the LabRack JSON API (same origin, cookie session + CSRF header).

export type StaffRole = "admin" | "organizer" | "staff" | "judge";

export interface StaffPrincipal {
  kind: "staff";
  id: string | number;
  username: string;
  role: StaffRole;
  must_change_password: boolean;
}

export interface ParticipantPrincipal {
  kind: "participant";
  id: string | number;
  name: string;
  team_id: string | number;
  event_id: string | number;
}

export type Principal = StaffPrincipal | ParticipantPrincipal;

export interface AuthResponse {
  principal: Principal;
  csrf_token: string;
}

export type EventState = "draft" | "live" | "frozen" | "ended" | "archived";

export interface LabEvent {
  id: string | number;
  name: string;
  code: string;
  state: EventState;
  /** the states staff may move it to now */
  next_states: EventState[];
  starts_at: string;
  ends_at: string;
  created_at: string;
  updated_at: string;
  team_count: number;
  participant_count: number;
}

export interface Team {
  id: string | number;
  event_id: string | number;
  name: string;
  participant_count: number;
  created_at: string;
}

export interface Participant {
  id: string | number;
  event_id: string | number;
  team_id: string | number;
  team_name: string;
  name: string;
  email: string | null;
  joined_at: string | null;
  created_at: string;
}

export interface IssuedJoinCode {
  participant: Participant;
  join_code: string;
}

export interface ImportResult {
  imported: number;
  teams_created: number;
  participants: IssuedJoinCode[];
}

export interface MeResponse {
  participant: Participant;
  team: { id: string | number; name: string };
  event: Pick<LabEvent, "id" | "name" | "code" | "state" | "starts_at" | "ends_at">;
  teammates: { id: string | number; name: string; joined: boolean }[];
}

export type AllocationState =
  | "requested"
  | "provisioning"
  | "active"
  | "releasing"
  | "released"
  | "failed"
  | "release_failed"
  | "unreachable";

export interface Allocation {
  id: number;
  event_id: number;
  team_id: number;
  team_name: string;
  host_id: number;
  host_name: string;
  template: string;
  state: AllocationState;
  busy: boolean;
  reason: string | null;
  desktop_ready: boolean;
  created_at: string;
  updated_at: string;
  /** failed while its host was silent past the grace: staff may resume it */
  resumable?: boolean;
}

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

export interface LabHost {
  id: number;
  name: string;
  address: string;
  gpus: number;
  capacity: number;
  labs_in_use: number;
  healthy: boolean;
  last_seen_at: string;
  enrolled_at: string;
  telemetry: Telemetry | null;
}

export interface LabTemplate {
  name: string;
  runtime: string;
  gpus: number;
  gpu_memory_mib: number | null;
  skeleton: string;
  checks: { name: string; dimension: string; weight: number; hidden: boolean }[];
}

export interface BoardRow {
  rank: number;
  team_id: number;
  team: string;
  total: number;
  check_points: number;
  judge_points: number;
  adjustments: number;
  dimensions: Record<string, number>;
  checks_passed: number;
  checks_scored: number;
  reached_ms: number | null;
}

export interface Leaderboard {
  event_id: number;
  dimensions: string[];
  bracket: string | null;
  as_of_ms: number | null;
  rows: BoardRow[];
}

export interface PublicBoard {
  event: string;
  state: EventState;
  frozen_at: string | null;
  board: Leaderboard;
}

export interface MyCheck {
  name: string;
  dimension: string;
  weight: number;
  state: string;
  message: string | null;
  finished_at: string | null;
}

export interface MyChecks {
  checks: MyCheck[];
  hidden_checks: number;
  visible_points: number;
  running: boolean;
}

export interface Submission {
  id: number;
  team_id: number;
  version: string;
  note: string | null;
  submitted_at: string;
}

export interface Hint {
  id: number;
  title: string;
  cost: number;
  check: string | null;
  body: string | null;
  unlocked: boolean;
  unlocked_by_teams: number | null;
}

export interface AgentMessage {
  id: number;
  team_id: number | null;
  agent: string;
  source: "llm" | "rules";
  body: string;
  at: string;
}

export interface BatchQueued {
  batch_id: number;
  queued: number;
  skipped: { team_id: number; team: string; reason: string }[];
}

export interface BatchView {
  id: number;
  reason: string;
  counts: Record<"queued" | "running" | "passed" | "failed" | "error" | "cancelled", number>;
  done: boolean;
}

export interface Job {
  id: number;
  kind: string;
  payload: unknown;
  state: string;
  attempts: number;
  max_attempts: number;
  last_error: string | null;
  updated_ms: number;
}

export interface Rubric {
  dimensions: { name: string; label: string; judge_max: number }[];
  brackets: { name: string; teams: string[] }[];
}

export interface Alert {
  id: number;
  team_id: number | null;
  kind: string;
  detail: string;
  at: string;
}

export interface LedgerEntry {
  id: number;
  team_id: number | null;
  kind: string;
  quantity: number;
  unit: string;
  amount_cents: number;
  note: string;
  actor: string;
  created_ms: number;
}

export interface LedgerView {
  entries: LedgerEntry[];
  balance: { credits_cents: number; charges_cents: number; balance_cents: number; status: "ok" | "low" | "depleted" };
}

export interface SyncView {
  link: { configured: boolean; state: string; cloud: string | null; acked: number; last_error: string | null; linked_since_ms: number | null };
  pending_rows: number;
  pending_age_ms: number | null;
  last_seq: number;
}

export interface RowError {
  line: number;
  reason: string;
}

/** RFC 9457 problem details as answered by the server. */
export interface Problem {
  type?: string;
  title?: string;
  status?: number;
  detail?: string;
  field?: string;
  errors?: RowError[];
}

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
      if (text) return { status: res.status, title: res.statusText, detail: text.slice(0, 500) };
    }
  } catch {
    // fall through to the generic problem
  }
  return { status: res.status, title: res.statusText || `HTTP ${res.status}` };
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

/** What a staff console needs to connect (public). */
export interface ApplianceCard {
  url: string | null;
  ca_fingerprint: string | null;
  qr_svg: string | null;
}

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
