// The browser half of `cargo xtask bench stream` (xtask/src/bench_stream.rs sets up the
// appliance, a lab host, xrdp and the lab; not a test). In Debian's Chromium:
//
// 1. Glass-to-glass latency at each size: the desktop is sized to exactly W×H (the viewer's
//    window decides it), then the lab session's root window is recoloured (`xsetroot`, run
//    here); the time from xsetroot's exit to the first decoded video frame showing the new
//    colour is one sample. Both clocks are this machine's wall clock.
// 2. Bandwidth and frame rate at 1280×720 under the session's workloads (idle, typing,
//    motion), switched through the `mode` file its workload script reads.
//
// Env (required): LABRACK_URL, LABRACK_EVENT_CODE, LABRACK_JOIN_CODE, LABRACK_LAB_USER,
// LABRACK_LAB_DISPLAY, LABRACK_MODE_FILE. Optional: LABRACK_FLIPS (default 30),
// LABRACK_PHASE_SECS (10), CHROMIUM_PATH. Prints one JSON line.

import { execFileSync } from "node:child_process";
import { writeFile } from "node:fs/promises";
import { launchChromium, need, tid } from "./chromium.mjs";

const BASE_URL = need("LABRACK_URL", "cargo xtask bench stream").replace(/\/+$/, "");
const LAB_USER = need("LABRACK_LAB_USER", "cargo xtask bench stream");
const LAB_DISPLAY = need("LABRACK_LAB_DISPLAY", "cargo xtask bench stream");
const MODE_FILE = need("LABRACK_MODE_FILE", "cargo xtask bench stream");
const FLIPS = Number(process.env.LABRACK_FLIPS ?? 30);
const PHASE_SECS = Number(process.env.LABRACK_PHASE_SECS ?? 10);
const wallNow = () => performance.timeOrigin + performance.now();
const COLOURS = [[255, 0, 0], [0, 0, 255], [0, 200, 0]];
const hex = (rgb) => `#${rgb.map((c) => c.toString(16).padStart(2, "0")).join("")}`;

const quantile = (values, q) => {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
};

const { context, close: closeChromium } = await launchChromium("bench-stream", { width: 1440, height: 960 });
const result = { latency: {}, phases: {} };
try {
  // Keep a handle on the page's peer connection for its inbound statistics.
  await context.addInitScript(() => {
    const Original = window.RTCPeerConnection;
    window.RTCPeerConnection = class extends Original {
      constructor(...args) {
        super(...args);
        window.__labrackPeer = this;
      }
    };
  });
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(60_000);
  // The appliance's own view (encoder bitrate, loss, keyframe requests), from its stats messages.
  let applianceStats = null;
  page.on("websocket", (ws) =>
    ws.on("framereceived", (frame) => {
      try {
        const msg = JSON.parse(String(frame.payload));
        if (msg.type === "stats") applianceStats = msg;
      } catch {}
    }),
  );
  await page.goto(`${BASE_URL}/#/join`);
  await page.fill(tid("join-event-code"), need("LABRACK_EVENT_CODE", "cargo xtask bench stream"));
  await page.fill(tid("join-code-input"), need("LABRACK_JOIN_CODE", "cargo xtask bench stream"));
  await page.click(tid("join-submit"));
  await page.waitForSelector(tid("open-desktop"));
  await page.click(tid("open-desktop"));
  await page.waitForSelector(`${tid("desktop-status")}[data-state="connected"]`);

  // Watches one desktop pixel on every decoded frame (requestVideoFrameCallback) and notes
  // when it turns the wanted colour.
  await page.evaluate(() => {
    const v = document.querySelector('[data-testid="desktop-video"]');
    const c = document.createElement("canvas");
    c.width = 1;
    c.height = 1;
    const g = c.getContext("2d", { willReadFrequently: true });
    window.__watch = { want: null, at: null, x: 0, y: 0 };
    const onFrame = (_now, metadata) => {
      const w = window.__watch;
      if (w.want && w.at === null && v.videoWidth) {
        g.drawImage(v, w.x, w.y, 1, 1, 0, 0, 1, 1);
        const d = g.getImageData(0, 0, 1, 1).data;
        if (Math.abs(d[0] - w.want[0]) < 40 && Math.abs(d[1] - w.want[1]) < 40 && Math.abs(d[2] - w.want[2]) < 40) {
          // When this frame was handed to the compositor: reading the pixel back (a software
          // YUV→RGB of the whole frame here) is the probe's cost, not the stream's.
          w.at = performance.timeOrigin + (metadata.presentationTime ?? performance.now());
          // When its last RTP packet arrived: splits the network-side time from the browser's.
          w.receivedAt = metadata.receiveTime ? performance.timeOrigin + metadata.receiveTime : null;
        }
      }
      v.requestVideoFrameCallback(onFrame);
    };
    v.requestVideoFrameCallback(onFrame);
  });

  const sizeTo = async (width, height) => {
    // The desktop follows the video area: make that area exactly width × height.
    const rect = await page.evaluate(() => {
      const r = document.querySelector('[data-testid="desktop-video"]').getBoundingClientRect();
      return [r.width, r.height];
    });
    const viewport = page.viewportSize();
    await page.setViewportSize({ width: Math.round(viewport.width + width - rect[0]), height: Math.round(viewport.height + height - rect[1]) });
    await page
      .waitForFunction(([w, h]) => {
        const v = document.querySelector('[data-testid="desktop-video"]');
        return v.videoWidth === w && v.videoHeight === h;
      }, [width, height], { timeout: 60_000 })
      .catch(async (error) => {
        const seen = await page.evaluate(() => {
          const v = document.querySelector('[data-testid="desktop-video"]');
          const r = v.getBoundingClientRect();
          return { video: [v.videoWidth, v.videoHeight], element: [r.width, r.height], status: document.querySelector('[data-testid="desktop-status"]')?.textContent };
        });
        throw new Error(`the desktop never became ${width}x${height}: ${JSON.stringify(seen)} (viewport ${JSON.stringify(page.viewportSize())}): ${error.message}`);
      });
  };

  const recolour = (rgb) => {
    execFileSync("xsetroot", ["-display", LAB_DISPLAY, "-solid", hex(rgb)], { env: { ...process.env, XAUTHORITY: `/home/${LAB_USER}/.Xauthority` } });
    return wallNow();
  };

  await writeFile(MODE_FILE, "idle\n");
  for (const [width, height] of [[1280, 720], [1920, 1080]]) {
    await sizeTo(width, height);
    await page.waitForTimeout(3000);
    const samples = [];
    const received = [];
    for (let i = 0; i < FLIPS; i += 1) {
      const want = COLOURS[i % COLOURS.length];
      // The root window shows at the right edge; the workload's xterm sits at the left.
      await page.evaluate(([want, x, y]) => Object.assign(window.__watch, { want, at: null, receivedAt: null, x, y }), [want, width - 40, Math.floor(height / 2)]);
      const changed = recolour(want);
      const deadline = Date.now() + 5000;
      let seenAt = null;
      let receivedAt = null;
      while (seenAt === null && Date.now() < deadline) {
        [seenAt, receivedAt] = await page.evaluate(() => [window.__watch.at, window.__watch.receivedAt]);
      }
      if (seenAt === null) throw new Error(`${width}x${height}: colour ${hex(want)} never reached the page`);
      samples.push(seenAt - changed);
      if (receivedAt !== null) received.push(receivedAt - changed);
      // Off the 30 fps grid, so samples fall at every phase of the frame timer.
      await page.waitForTimeout(200 + Math.floor(Math.random() * 200));
    }
    const receiver = await page.evaluate(async () => {
      let out = {};
      (await window.__labrackPeer.getStats()).forEach((r) => {
        if (r.type === "inbound-rtp" && r.kind === "video") {
          out = {
            jitter_buffer_ms: (r.jitterBufferDelay / Math.max(1, r.jitterBufferEmittedCount)) * 1000,
            decode_ms: (r.totalDecodeTime / Math.max(1, r.framesDecoded)) * 1000,
          };
        }
      });
      return out;
    });
    result.latency[`${width}x${height}`] = {
      p50_ms: quantile(samples, 0.5),
      p95_ms: quantile(samples, 0.95),
      samples: samples.map((s) => Math.round(s * 10) / 10),
      // the browser's share, averaged over every frame so far
      browser: receiver,
      // X change → the frame's last RTP packet in the browser (the rest is the browser's)
      received_p50_ms: received.length ? quantile(received, 0.5) : null,
      // the appliance's: RDP update in → frame out, averaged over every frame so far
      appliance_change_to_send_ms: applianceStats?.change_to_send_ms ?? null,
    };
  }

  await sizeTo(1280, 720);
  const inbound = () =>
    page.evaluate(async () => {
      const pc = window.__labrackPeer;
      let bytes = 0;
      let frames = 0;
      if (pc) {
        (await pc.getStats()).forEach((r) => {
          if (r.type === "inbound-rtp" && r.kind === "video") {
            bytes = r.bytesReceived;
            frames = r.framesDecoded;
          }
        });
      }
      return { bytes, frames };
    });
  // Idle last: right after a resize or a burst of motion, the picture is still settling.
  for (const mode of ["typing", "motion", "idle"]) {
    await writeFile(MODE_FILE, `${mode}\n`);
    await page.waitForTimeout(mode === "idle" ? 6000 : 3000);
    const before = await inbound();
    const sentBefore = applianceStats;
    const startedAt = Date.now();
    await page.waitForTimeout(PHASE_SECS * 1000);
    const after = await inbound();
    const sentAfter = applianceStats;
    const endedAt = Date.now();
    const secs = (endedAt - startedAt) / 1000;
    result.phases[mode] = {
      started_at_ms: startedAt,
      ended_at_ms: endedAt,
      // what the browser received and decoded
      kbit_per_s: ((after.bytes - before.bytes) * 8) / 1000 / secs,
      fps: (after.frames - before.frames) / secs,
      // what the appliance sent (its 2-s stats messages nearest the phase's ends)
      sent_kbit_per_s: sentBefore && sentAfter ? ((sentAfter.bytes - sentBefore.bytes) * 8) / 1000 / secs : null,
      sent_fps: sentBefore && sentAfter ? (sentAfter.frames - sentBefore.frames) / secs : null,
      appliance: sentAfter,
    };
  }
  await writeFile(MODE_FILE, "idle\n");
  console.log(JSON.stringify(result));
  await page.close();
} finally {
  await closeChromium();
}
