// Drives the desktop viewer in Debian's Chromium; started by the Rust test
// `the_desktop_streams_to_chromium_and_takes_input` (tests/tests/lab_hosts.rs), which sets
// up the appliance, a lab host, xrdp and a lab whose session paints its background
// #1e90ff and runs an xterm at the top left. Not a standalone test.
//
// Env (required): LABRACK_URL, LABRACK_EVENT_CODE, LABRACK_JOIN_CODE, LABRACK_ALLOCATION,
// LABRACK_STAFF_PASSWORD (of `admin`, who then watches view-only and tries to type).
// Optional: LABRACK_SCREENSHOT_DIR, CHROMIUM_PATH. Prints one JSON line on success.

import assert from "node:assert/strict";
import { mkdtemp, mkdir, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const need = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is required (this script is driven by the lab_hosts Rust test)`);
  return value;
};
const BASE_URL = need("LABRACK_URL").replace(/\/+$/, "");
const SCREENSHOT_DIR = process.env.LABRACK_SCREENSHOT_DIR ?? "";
const tid = (id) => `[data-testid="${id}"]`;
const close = (a, b, tolerance = 24) => a.every((v, i) => Math.abs(v - b[i]) <= tolerance);

const userDataDir = await mkdtemp(join(tmpdir(), "labrack-chromium-desktop-"));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: process.env.CHROMIUM_PATH || "/usr/bin/chromium",
  headless: true,
  ignoreHTTPSErrors: true,
  viewport: { width: 1280, height: 860 },
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required"],
});
const urls = [];
try {
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(30_000);
  const errors = [];
  page.on("pageerror", (err) => errors.push(String(err)));
  page.on("request", (req) => urls.push(req.url()));
  page.on("websocket", (ws) => urls.push(ws.url()));

  await page.goto(`${BASE_URL}/#/join`);
  await page.fill(tid("join-event-code"), need("LABRACK_EVENT_CODE"));
  await page.fill(tid("join-code-input"), need("LABRACK_JOIN_CODE"));
  await page.click(tid("join-submit"));
  await page.waitForSelector(tid("open-desktop"));
  const opened = Date.now();
  await page.click(tid("open-desktop"));
  await page.waitForSelector(`${tid("desktop-status")}[data-state="connected"]`);

  // Sample a desktop pixel (in desktop coordinates) from the decoded video.
  const pixel = (dx, dy) =>
    page.evaluate(([dx, dy]) => {
      const v = document.querySelector('[data-testid="desktop-video"]');
      if (!v || !v.videoWidth) return null;
      const c = document.createElement("canvas");
      c.width = v.videoWidth;
      c.height = v.videoHeight;
      const g = c.getContext("2d");
      g.drawImage(v, 0, 0);
      const d = g.getImageData(Math.min(dx, c.width - 1), Math.min(dy, c.height - 1), 1, 1).data;
      return [d[0], d[1], d[2]];
    }, [dx, dy]);
  const waitForColour = async (rgb, what) => {
    const deadline = Date.now() + 30_000;
    let seen = null;
    while (Date.now() < deadline) {
      seen = await pixel(900, 600);
      if (seen && close(seen, rgb)) return seen;
      await page.waitForTimeout(100);
    }
    throw new Error(`${what}: the desktop never showed ${rgb} (last ${seen})`);
  };
  const blue = await waitForColour([30, 144, 255], "the lab session's background");
  const firstPictureMs = Date.now() - opened;
  const size = await page.evaluate(() => {
    const v = document.querySelector('[data-testid="desktop-video"]');
    return [v.videoWidth, v.videoHeight];
  });
  if (SCREENSHOT_DIR) {
    await mkdir(SCREENSHOT_DIR, { recursive: true });
    await page.screenshot({ path: join(SCREENSHOT_DIR, "desktop-1-live.png") });
  }

  // Point at the xterm (top left of the desktop) and type a command there: it repaints
  // the remote background, which proves the keystrokes reached an application.
  const client = await page.evaluate(([dx, dy]) => {
    const v = document.querySelector('[data-testid="desktop-video"]');
    const r = v.getBoundingClientRect();
    const scale = Math.min(r.width / v.videoWidth, r.height / v.videoHeight);
    const ox = (r.width - v.videoWidth * scale) / 2;
    const oy = (r.height - v.videoHeight * scale) / 2;
    return [r.left + ox + dx * scale, r.top + oy + dy * scale];
  }, [80, 60]);
  await page.mouse.move(client[0], client[1]);
  await page.mouse.click(client[0], client[1]);
  await page.waitForTimeout(300);
  await page.keyboard.type("xsetroot -solid red", { delay: 20 });
  await page.keyboard.press("Enter");
  const red = await waitForColour([255, 0, 0], "typing in the remote xterm");
  if (SCREENSHOT_DIR) await page.screenshot({ path: join(SCREENSHOT_DIR, "desktop-2-typed.png") });

  let shown = [255, 0, 0];
  // The RDP server restarts under the stream (the Rust test does it on this signal): the
  // appliance reconnects its RDP session and input and pictures flow again.
  if (process.env.LABRACK_RESTART_SIGNAL) {
    const { writeFile, access } = await import("node:fs/promises");
    await writeFile(process.env.LABRACK_RESTART_SIGNAL, "restart");
    const done = `${process.env.LABRACK_RESTART_SIGNAL}.done`;
    const until = Date.now() + 60_000;
    for (;;) {
      try {
        await access(done);
        break;
      } catch {
        if (Date.now() > until) throw new Error("the test never restarted the RDP server");
        await page.waitForTimeout(100);
      }
    }
    // Whether xrdp hands back the surviving X session (red) or starts a new one (blue),
    // keystrokes must reach it through the reconnected stream.
    await page.waitForTimeout(1500);
    await page.mouse.move(client[0], client[1]);
    await page.mouse.click(client[0], client[1]);
    await page.waitForTimeout(300);
    await page.keyboard.type("xsetroot -solid green", { delay: 20 });
    await page.keyboard.press("Enter");
    await waitForColour([0, 255, 0], "typing after the RDP server restarted");
    shown = [0, 255, 0];
  }

  // The appliance itself restarts (the Rust test does it on this signal): the page notices,
  // says so, and reconnects with a fresh ticket on its own.
  let reconnectedAfterApplianceRestart = false;
  if (process.env.LABRACK_APPLIANCE_RESTART_SIGNAL) {
    const { writeFile } = await import("node:fs/promises");
    await writeFile(process.env.LABRACK_APPLIANCE_RESTART_SIGNAL, "restart");
    await page.waitForSelector(`${tid("desktop-status")}[data-state="reconnecting"]`, { timeout: 60_000 });
    await page.waitForSelector(`${tid("desktop-status")}[data-state="connected"]`, { timeout: 60_000 });
    // xrdp either hands the new RDP login the running session (as it was) or starts a
    // fresh one (its background again): both are a live desktop.
    const until = Date.now() + 30_000;
    let seen = null;
    while (Date.now() < until) {
      seen = await pixel(900, 600);
      if (seen && (close(seen, shown) || close(seen, [30, 144, 255]))) break;
      await page.waitForTimeout(100);
    }
    assert.ok(seen && (close(seen, shown) || close(seen, [30, 144, 255])), `no live desktop after the appliance restarted: ${seen}`);
    shown = close(seen, shown) ? shown : [30, 144, 255];
    reconnectedAfterApplianceRestart = true;
  }

  // The team's lab is reset while the page is open: the page reconnects to the fresh
  // session (new password, new session: its own background colour again).
  let reconnectedAfterReset = false;
  if (process.env.LABRACK_RESET_SIGNAL) {
    const { writeFile } = await import("node:fs/promises");
    // Paint the old session red, so a fresh one (its own blue) is unmistakable.
    await page.mouse.click(client[0], client[1]);
    await page.keyboard.type("xsetroot -solid red", { delay: 20 });
    await page.keyboard.press("Enter");
    await waitForColour([255, 0, 0], "typing before the reset");
    await writeFile(process.env.LABRACK_RESET_SIGNAL, "reset");
    await page.waitForSelector(`${tid("desktop-status")}[data-state="reconnecting"]`, { timeout: 60_000 });
    await page.waitForSelector(`${tid("desktop-status")}[data-state="connected"]`, { timeout: 60_000 });
    await waitForColour([30, 144, 255], "the fresh session after the reset");
    shown = [30, 144, 255];
    reconnectedAfterReset = true;
  }

  // Staff watch view-only: their keystrokes must not reach the desktop.
  await page.goto(`${BASE_URL}/#/me`);
  await page.click(tid("logout"));
  await page.waitForSelector(tid("login-form"));
  await page.fill(tid("login-username"), "admin");
  await page.fill(tid("login-password"), need("LABRACK_STAFF_PASSWORD"));
  await page.click(tid("login-submit"));
  await page.waitForSelector(tid("nav-events"));
  await page.goto(`${BASE_URL}/#/desktop/${need("LABRACK_ALLOCATION")}`);
  await page.waitForSelector(`${tid("desktop-status")}[data-state="connected"]`);
  await page.waitForFunction(() => /view only/.test(document.querySelector('[data-testid="desktop-status"]')?.textContent ?? ""));
  await waitForColour(shown, "the staff view");
  const staffClient = await page.evaluate(() => {
    const r = document.querySelector('[data-testid="desktop-video"]').getBoundingClientRect();
    return [r.left + r.width / 10, r.top + r.height / 8];
  });
  await page.mouse.click(staffClient[0], staffClient[1]);
  await page.keyboard.type("xsetroot -solid green", { delay: 20 });
  await page.keyboard.press("Enter");
  await page.waitForTimeout(2000);
  const still = await pixel(900, 600);
  if (SCREENSHOT_DIR) await page.screenshot({ path: join(SCREENSHOT_DIR, "desktop-3-view-only.png") });
  assert.ok(close(still, shown), `a view-only viewer changed the desktop: ${still}`);

  assert.deepEqual(errors, [], "no page errors");
  for (const url of urls) assert.ok(!/ticket|token|sdp/i.test(new URL(url).search), `no secret in a URL query: ${url}`);
  console.log(JSON.stringify({ blue, red, first_picture_ms: firstPictureMs, video: size, recovered_after_rdp_restart: Boolean(process.env.LABRACK_RESTART_SIGNAL), reconnected_after_appliance_restart: reconnectedAfterApplianceRestart, reconnected_after_reset: reconnectedAfterReset, view_only_unchanged: still }));
  await page.close();
} finally {
  await context.close().catch(() => {});
  await rm(userDataDir, { recursive: true, force: true }).catch(() => {});
}
