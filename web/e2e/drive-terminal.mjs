// Drives the browser terminal in Debian's Chromium; started by the Rust test
// `the_browser_terminal_runs_a_command_in_chromium` (tests/tests/lab_hosts.rs), which
// sets up the appliance, a lab host, sshd and a lab first. Not a standalone test.
//
// Env (all required): LABRACK_URL, LABRACK_EVENT_CODE, LABRACK_JOIN_CODE, LABRACK_EXPECT
// (text the command's output must contain). Optional: LABRACK_SCREENSHOT_DIR, CHROMIUM_PATH.
// Prints `resized ROWS COLS -> ROWS COLS` and exits 0 on success.

import assert from "node:assert/strict";
import { mkdir } from "node:fs/promises";
import { join } from "node:path";
import { launchChromium, need, tid } from "./chromium.mjs";

const BASE_URL = need("LABRACK_URL").replace(/\/+$/, "");
const EVENT_CODE = need("LABRACK_EVENT_CODE");
const JOIN_CODE = need("LABRACK_JOIN_CODE");
const EXPECT = need("LABRACK_EXPECT");
const SCREENSHOT_DIR = process.env.LABRACK_SCREENSHOT_DIR ?? "";

const { context, close: closeChromium } = await launchChromium("term", { width: 1000, height: 700 });
const urls = [];
try {
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(20_000);
  const errors = [];
  page.on("pageerror", (err) => errors.push(String(err)));
  page.on("request", (req) => urls.push(req.url()));
  page.on("websocket", (ws) => urls.push(ws.url()));

  await page.goto(`${BASE_URL}/#/join`);
  await page.fill(tid("join-event-code"), EVENT_CODE);
  await page.fill(tid("join-code-input"), JOIN_CODE);
  await page.click(tid("join-submit"));
  await page.waitForSelector(tid("open-terminal"));
  if (SCREENSHOT_DIR) {
    await mkdir(SCREENSHOT_DIR, { recursive: true });
    await page.screenshot({ path: join(SCREENSHOT_DIR, "terminal-1-lab-card.png") });
  }
  await page.click(tid("open-terminal"));
  await page.waitForSelector(`${tid("terminal-status")}[data-state="ready"]`);
  await page.click(tid("terminal-screen"));
  await page.keyboard.type("echo $((6*7))-$(whoami); stty size\n");
  const rows = page.locator(".xterm-rows");
  await page.waitForFunction((expect) => document.querySelector(".xterm-rows")?.textContent?.includes(expect), EXPECT);
  const sizeOf = async (marker) => {
    await page.keyboard.type(`echo ${marker}-$(stty size | tr ' ' x)\n`);
    const handle = await page.waitForFunction(
      (m) => {
        const text = document.querySelector(".xterm-rows")?.textContent ?? "";
        const found = [...text.matchAll(new RegExp(`${m}-(\\d+)x(\\d+)`, "g"))];
        return found.length ? `${found[found.length - 1][1]} ${found[found.length - 1][2]}` : null;
      },
      marker,
    );
    return handle.jsonValue();
  };
  const before = await sizeOf("SZA");
  await page.setViewportSize({ width: 1400, height: 950 });
  // The page refits on resize; give the PTY a moment to follow.
  await page.waitForTimeout(500);
  const after = await sizeOf("SZB");
  assert.notEqual(after, before, "the PTY followed the window size");
  if (SCREENSHOT_DIR) await page.screenshot({ path: join(SCREENSHOT_DIR, "terminal-2-command.png") });
  assert.ok((await rows.textContent()).includes(EXPECT));
  assert.deepEqual(errors, [], "no page errors");
  for (const url of urls) assert.ok(!/ticket|token/i.test(new URL(url).search), `no secret in a URL query: ${url}`);
  console.log(`resized ${before} -> ${after}`);
  // Closing the tab must close the SSH channel; the Rust test checks the shell is gone.
  await page.close();
} finally {
  await closeChromium();
}
