// Drives the team's scoring sections and the projector scoreboard in Debian's Chromium;
// started by the Rust test `the_team_page_and_the_projector_scoreboard_work_in_chromium`
// (tests/tests/lab_hosts.rs), which sets up the appliance, a lab host, a lab with checks
// and a hint first. Not a standalone test.
//
// Env (all required): LABRACK_URL, LABRACK_EVENT_CODE, LABRACK_JOIN_CODE, LABRACK_EVENT_ID,
// LABRACK_TEAM (the team's name), LABRACK_JUDGE_USER and LABRACK_JUDGE_PASSWORD (a judge
// whose password is already changed). Optional: LABRACK_SCREENSHOT_DIR, CHROMIUM_PATH.
// Prints `board TEAM BEFORE -> AFTER` and exits 0 on success.

import assert from "node:assert/strict";
import { mkdir } from "node:fs/promises";
import { join } from "node:path";
import { launchChromium, need, tid } from "./chromium.mjs";

const BASE_URL = need("LABRACK_URL").replace(/\/+$/, "");
const EVENT_CODE = need("LABRACK_EVENT_CODE");
const JOIN_CODE = need("LABRACK_JOIN_CODE");
const EVENT_ID = need("LABRACK_EVENT_ID");
const TEAM = need("LABRACK_TEAM");
const JUDGE_USER = need("LABRACK_JUDGE_USER");
const JUDGE_PASSWORD = need("LABRACK_JUDGE_PASSWORD");
const SCREENSHOT_DIR = process.env.LABRACK_SCREENSHOT_DIR ?? "";

const shot = async (page, name) => {
  if (!SCREENSHOT_DIR) return;
  await mkdir(SCREENSHOT_DIR, { recursive: true });
  await page.screenshot({ path: join(SCREENSHOT_DIR, name), fullPage: true });
};

const { context, close } = await launchChromium("scoring", { width: 1200, height: 900 });
try {
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(30_000);
  const errors = [];
  page.on("pageerror", (err) => errors.push(String(err)));

  await page.goto(`${BASE_URL}/#/join`);
  await page.fill(tid("join-event-code"), EVENT_CODE);
  await page.fill(tid("join-code-input"), JOIN_CODE);
  await page.click(tid("join-submit"));
  await page.waitForSelector(tid("checks-table"));
  // Staff broadcast an announcement before the team opened its page.
  await page.waitForSelector(`${tid("announcement")} >> text=Doors close at 18:00`);

  // Checks: run them from the page; the failing one shows its FAIL reason.
  await page.click(tid("run-checks"));
  await page.waitForSelector(`${tid("check-row")}[data-state="failed"] >> text=port 8080 is closed`);
  await page.waitForSelector(`${tid("check-row")}[data-state="passed"]`);
  await page.waitForFunction(() => document.querySelector('[data-testid="visible-points"]')?.textContent === "10");

  // The projector in a second tab, live over server-sent events (the endpoint needs no
  // login; that is tested in-process).
  const board = await context.newPage();
  const boardErrors = [];
  board.on("pageerror", (err) => boardErrors.push(String(err)));
  await board.goto(`${BASE_URL}/#/scoreboard/${EVENT_ID}`);
  const totalOf = async () =>
    board.evaluate((team) => {
      const row = [...document.querySelectorAll('[data-testid="board-row"]')].find((r) => r.querySelector('[data-testid="board-team"]')?.textContent === team);
      return row?.querySelector('[data-testid="board-total"]')?.textContent ?? null;
    }, TEAM);
  await board.waitForFunction((team) => [...document.querySelectorAll('[data-testid="board-team"]')].some((c) => c.textContent === team), TEAM);
  await board.waitForSelector(`${tid("live-state")} >> text=Live`);
  const before = await totalOf();
  assert.equal(before, "10", "the scoreboard shows the team's check points");

  // Submit a version.
  await page.fill(tid("submit-version"), "v1.0");
  await page.fill(tid("submit-note"), "demo build");
  await page.click(tid("submit-button"));
  await page.waitForSelector(`${tid("submission")} >> text=v1.0`);

  // Unlock the paid hint: its text appears, and the projector follows without a reload.
  await page.click(tid("unlock-hint"));
  await page.waitForSelector(`${tid("hint")}[data-unlocked="yes"] ${tid("hint-body")}`);
  await board.waitForFunction(
    (team) => {
      const row = [...document.querySelectorAll('[data-testid="board-row"]')].find((r) => r.querySelector('[data-testid="board-team"]')?.textContent === team);
      return row?.querySelector('[data-testid="board-total"]')?.textContent === "7";
    },
    TEAM,
    { timeout: 15_000 },
  );
  const after = await totalOf();

  // Ask the assistant: with no model configured, the rules answer and say so.
  await page.fill(tid("assistant-question"), "Why does my server check fail?");
  await page.click(tid("assistant-ask"));
  await page.waitForSelector(`${tid("assistant-message")}[data-source="rules"] >> text=port 8080 is closed`);

  // A judge, in a browser of their own, scores the team; the projector follows.
  const { context: judgeContext, close: closeJudge } = await launchChromium("judge", { width: 1200, height: 900 });
  try {
    const judge = judgeContext.pages()[0] ?? (await judgeContext.newPage());
    judge.setDefaultTimeout(30_000);
    judge.on("pageerror", (err) => errors.push(String(err)));
    await judge.goto(`${BASE_URL}/#/login`);
    await judge.fill(tid("login-username"), JUDGE_USER);
    await judge.fill(tid("login-password"), JUDGE_PASSWORD);
    await judge.click(tid("login-submit"));
    await judge.waitForSelector(tid("page-events"));
    await judge.goto(`${BASE_URL}/#/events/${EVENT_ID}/scoring`);
    await judge.waitForSelector(`${tid("leaderboard-table")} >> text=${TEAM}`);
    await judge.waitForSelector(tid("watch-desktop"));
    assert.equal(await judge.locator(tid("rejudge")).count(), 0, "judges do not rejudge");
    await judge.selectOption(tid("judge-team"), { label: TEAM });
    await judge.fill(tid("judge-presentation"), "4");
    await judge.fill(tid("judge-comment"), "clear demo");
    await judge.click(tid("judge-submit"));
    await judge.waitForSelector(`${tid("judge-status")} >> text=Saved.`);
    await board.waitForFunction(
      (team) => {
        const row = [...document.querySelectorAll('[data-testid="board-row"]')].find((r) => r.querySelector('[data-testid="board-team"]')?.textContent === team);
        return row?.querySelector('[data-testid="board-total"]')?.textContent === "11";
      },
      TEAM,
      { timeout: 15_000 },
    );
    await shot(judge, "scoring-3-judge.png");
  } finally {
    await closeJudge();
  }
  await shot(page, "scoring-1-team-page.png");
  await shot(board, "scoring-2-projector.png");

  assert.deepEqual(errors, [], "no page errors on the team page");
  assert.deepEqual(boardErrors, [], "no page errors on the scoreboard");
  console.log(`board ${TEAM} ${before} -> ${after} -> ${await totalOf()}`);
} finally {
  await close();
}
