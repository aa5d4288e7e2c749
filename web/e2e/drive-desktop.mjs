// Drives the desktop viewer in Debian's Chromium; started by the Rust test
// `the_desktop_streams_to_chromium_and_takes_input` (tests/tests/lab_hosts.rs), which sets
// up the appliance, a lab host, xrdp and a lab whose session paints its background
// #1e90ff and runs an xterm at the top left. Not a standalone test.
//
// Env (required): LABRACK_URL, LABRACK_EVENT_CODE, LABRACK_JOIN_CODE, LABRACK_ALLOCATION,
// LABRACK_STAFF_PASSWORD (of `admin`, who then watches view-only and tries to type).
// LABRACK_LAB_HOME (the lab user's home, where the session's helper scripts write).
// Optional: LABRACK_SCREENSHOT_DIR, CHROMIUM_PATH. Prints one JSON line on success.

import assert from "node:assert/strict";
import { mkdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import { launchChromium, need, tid } from "./chromium.mjs";

const BASE_URL = need("LABRACK_URL").replace(/\/+$/, "");
const SCREENSHOT_DIR = process.env.LABRACK_SCREENSHOT_DIR ?? "";
const close = (a, b, tolerance = 24) => a.every((v, i) => Math.abs(v - b[i]) <= tolerance);

const { context, close: closeChromium } = await launchChromium("desktop", { width: 1280, height: 860 });
const urls = [];
try {
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(30_000);
  const errors = [];
  page.on("pageerror", (err) => errors.push(String(err)));
  page.on("request", (req) => urls.push(req.url()));
  // The last stats the appliance sent the page (receiver feedback → encoder bitrate).
  let lastStats = null;
  page.on("websocket", (ws) => {
    urls.push(ws.url());
    ws.on("framereceived", (frame) => {
      try {
        const msg = JSON.parse(String(frame.payload));
        if (msg.type === "stats") lastStats = msg;
      } catch {}
    });
  });

  await page.goto(`${BASE_URL}/#/join`);
  await page.fill(tid("join-event-code"), need("LABRACK_EVENT_CODE"));
  await page.fill(tid("join-code-input"), need("LABRACK_JOIN_CODE"));
  await page.click(tid("join-submit"));
  await page.waitForSelector(tid("open-desktop"));
  const opened = Date.now();
  await page.click(tid("open-desktop"));
  await page.waitForSelector(`${tid("desktop-status")}[data-state="connected"]`);

  // Sample a desktop pixel (in desktop coordinates) from the decoded video of a page.
  const pixelOf = (viewer, dx, dy) =>
    viewer.evaluate(([dx, dy]) => {
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
  const pixel = (dx, dy) => pixelOf(page, dx, dy);
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
  // The remote desktop takes the size of the video area (display control), so the picture
  // is shown 1:1 rather than scaled.
  const followsWindow = async (what) => {
    const handle = await page.waitForFunction(() => {
      const v = document.querySelector('[data-testid="desktop-video"]');
      const r = v.getBoundingClientRect();
      const want = [Math.floor(r.width) & ~1, Math.floor(r.height)];
      return v.videoWidth === want[0] && v.videoHeight === want[1] ? [v.videoWidth, v.videoHeight] : null;
    }, null, { timeout: 30_000 }).catch(async () => {
      const seen = await page.evaluate(() => {
        const v = document.querySelector('[data-testid="desktop-video"]');
        const r = v.getBoundingClientRect();
        return { video: [v.videoWidth, v.videoHeight], element: [r.width, r.height] };
      });
      throw new Error(`${what}: the desktop never took the window's size (${JSON.stringify(seen)})`);
    });
    return handle.jsonValue();
  };
  const size = await followsWindow("after connecting");
  if (SCREENSHOT_DIR) {
    await mkdir(SCREENSHOT_DIR, { recursive: true });
    await page.screenshot({ path: join(SCREENSHOT_DIR, "desktop-1-live.png") });
  }

  // Point at the xterm (top left of the desktop) and type a command there: it repaints
  // the remote background, which proves the keystrokes reached an application.
  const xtermAt = () =>
    page.evaluate(([dx, dy]) => {
      const v = document.querySelector('[data-testid="desktop-video"]');
      const r = v.getBoundingClientRect();
      const scale = Math.min(r.width / v.videoWidth, r.height / v.videoHeight);
      const ox = (r.width - v.videoWidth * scale) / 2;
      const oy = (r.height - v.videoHeight * scale) / 2;
      return [r.left + ox + dx * scale, r.top + oy + dy * scale];
    }, [80, 60]);
  let client = await xtermAt();
  const typeInXterm = async (text) => {
    client = await xtermAt();
    await page.mouse.move(client[0], client[1]);
    await page.mouse.click(client[0], client[1]);
    await page.waitForTimeout(300);
    await page.keyboard.type(text, { delay: 20 });
    await page.keyboard.press("Enter");
  };
  await typeInXterm("xsetroot -solid red");
  const red = await waitForColour([255, 0, 0], "typing in the remote xterm");
  if (SCREENSHOT_DIR) await page.screenshot({ path: join(SCREENSHOT_DIR, "desktop-2-typed.png") });

  // Files the session's helper scripts write in the lab user's home.
  const LAB_HOME = need("LABRACK_LAB_HOME");
  const fileSays = async (name, what) => {
    const deadline = Date.now() + 20_000;
    let seen = null;
    while (Date.now() < deadline) {
      seen = await readFile(join(LAB_HOME, name), "utf8").catch(() => null);
      if (seen !== null && seen.length > 0) return seen;
      await page.waitForTimeout(200);
    }
    throw new Error(`${what}: ${name} never appeared in the lab's home`);
  };

  // Clipboard, browser → desktop: text sent from the page is what an X application on the
  // desktop pastes (the session's `cbout` script runs `xclip -o` into a file).
  const toDesktop = "labrack → desktop ✓ 42";
  await page.click(tid("desktop-clipboard-toggle"));
  await page.fill(tid("desktop-clipboard"), toDesktop);
  await page.click(tid("desktop-clipboard-send"));
  await page.waitForTimeout(300);
  await typeInXterm("sh cbout");
  const pasted = await fileSays("from-browser.txt", "the desktop pasting the browser's text");
  assert.equal(pasted, toDesktop, "the desktop pastes what the browser sent");

  // Clipboard, desktop → browser: `cbin` copies text on the desktop (xclip); the page shows it.
  await typeInXterm("sh cbin");
  await page.waitForFunction(() => document.querySelector('[data-testid="desktop-clipboard"]').value === "copied on the desktop ✓", null, { timeout: 20_000 })
    .catch(async () => {
      throw new Error(`the page never received the desktop's clipboard: ${JSON.stringify(await page.inputValue(tid("desktop-clipboard")))}`);
    });
  const fromDesktop = await page.inputValue(tid("desktop-clipboard"));
  await page.click(tid("desktop-clipboard-toggle"));

  // A key the scancode table cannot place (no physical key code, as from another layout or
  // an input method) travels as Unicode: the session's `typed` script reads a line from the
  // xterm into a file.
  await typeInXterm("sh typed");
  // Keys typed ahead reach the tty while the shell still holds it in raw mode: type once the
  // script says it is reading.
  await fileSays("typed.ready", "the typed script starting");
  const cdp = await context.newCDPSession(page);
  for (const type of ["keyDown", "keyUp"]) await cdp.send("Input.dispatchKeyEvent", { type, key: "~", text: type === "keyDown" ? "~" : undefined, code: "" });
  await page.keyboard.type("ok", { delay: 20 });
  await page.keyboard.press("Enter");
  const typedUnicode = await fileSays("typed.txt", "the Unicode key");
  assert.equal(typedUnicode, "~ok\n", "a Unicode key reaches the desktop");

  // The browser window shrinks: the remote desktop follows.
  await page.setViewportSize({ width: 1000, height: 700 });
  const resized = await followsWindow("after the window shrank");
  assert.ok(resized[0] < size[0] && resized[1] < size[1], `the desktop shrank with the window: ${resized} from ${size}`);
  if (SCREENSHOT_DIR) await page.screenshot({ path: join(SCREENSHOT_DIR, "desktop-2b-resized.png") });
  const feedback = lastStats;
  await waitForColour([255, 0, 0], "the resized desktop");

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
    await typeInXterm("xsetroot -solid green");
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
    await typeInXterm("xsetroot -solid red");
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

  // A browser that offers no H.264 (Firefox without its OpenH264 plugin, which an offline
  // venue cannot download) gets VP8: a second staff viewer offers VP8 only, while the
  // first keeps H.264 — one desktop, one encode per codec.
  const vp8Page = await context.newPage();
  await vp8Page.addInitScript(() => {
    const original = RTCPeerConnection.prototype.addTransceiver;
    RTCPeerConnection.prototype.addTransceiver = function (...args) {
      const transceiver = original.apply(this, args);
      transceiver.setCodecPreferences(RTCRtpReceiver.getCapabilities("video").codecs.filter((c) => /vp8/i.test(c.mimeType)));
      return transceiver;
    };
  });
  let vp8Codec = null;
  vp8Page.on("websocket", (ws) =>
    ws.on("framereceived", (frame) => {
      try {
        const msg = JSON.parse(String(frame.payload));
        if (msg.type === "answer") vp8Codec = msg.codec;
      } catch {}
    }),
  );
  await vp8Page.goto(`${BASE_URL}/#/desktop/${need("LABRACK_ALLOCATION")}`);
  await vp8Page.waitForSelector(`${tid("desktop-status")}[data-state="connected"]`);
  let vp8Colour = null;
  for (const until = Date.now() + 30_000; Date.now() < until; await vp8Page.waitForTimeout(100)) {
    vp8Colour = await pixelOf(vp8Page, 900, 600);
    if (vp8Colour && close(vp8Colour, shown)) break;
  }
  assert.equal(vp8Codec, "VP8", "the VP8-only browser was answered with VP8");
  assert.ok(vp8Colour && close(vp8Colour, shown), `the VP8 viewer shows the desktop: ${vp8Colour}`);
  if (SCREENSHOT_DIR) await vp8Page.screenshot({ path: join(SCREENSHOT_DIR, "desktop-4-vp8.png") });
  await vp8Page.close();

  assert.deepEqual(errors, [], "no page errors");
  for (const url of urls) assert.ok(!/ticket|token|sdp/i.test(new URL(url).search), `no secret in a URL query: ${url}`);
  console.log(JSON.stringify({ blue, red, first_picture_ms: firstPictureMs, video: size, resized, clipboard_pasted_on_desktop: pasted, clipboard_from_desktop: fromDesktop, unicode_typed: typedUnicode, feedback, recovered_after_rdp_restart: Boolean(process.env.LABRACK_RESTART_SIGNAL), reconnected_after_appliance_restart: reconnectedAfterApplianceRestart, reconnected_after_reset: reconnectedAfterReset, view_only_unchanged: still, vp8_codec: vp8Codec, vp8_colour: vp8Colour }));
  await page.close();
} finally {
  await closeChromium();
}
