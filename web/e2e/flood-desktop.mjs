// The browser half of phase 3 of `cargo xtask bench abuse` (xtask/src/bench_abuse.rs sets
// up the appliance, lab hosts and the lab; not a test): a participant's own desktop viewer in
// Debian's Chromium, then a flood through the page's own connections for LABRACK_FLOOD_SECS:
// pointer moves on the "input" data channel as fast as its buffer drains, and clipboard
// texts and alternating resizes on the signaling socket, hundreds a second.
//
// Env (required): LABRACK_URL, LABRACK_EVENT_CODE, LABRACK_JOIN_CODE. Optional:
// LABRACK_FLOOD_SECS (default 15), CHROMIUM_PATH. Prints one JSON line.

import { launchChromium, need, tid } from "./chromium.mjs";

const BY = "cargo xtask bench abuse";
const BASE_URL = need("LABRACK_URL", BY).replace(/\/+$/, "");
const FLOOD_SECS = Number(process.env.LABRACK_FLOOD_SECS ?? 15);

const { context, close } = await launchChromium("flood-desktop", { width: 1280, height: 860 });
try {
  // Keep handles on the page's data channel and signaling socket.
  await context.addInitScript(() => {
    const createDataChannel = RTCPeerConnection.prototype.createDataChannel;
    RTCPeerConnection.prototype.createDataChannel = function (...args) {
      const channel = createDataChannel.apply(this, args);
      window.__labrackInput = channel;
      return channel;
    };
    const Original = window.WebSocket;
    window.WebSocket = class extends Original {
      constructor(...args) {
        super(...args);
        if (String(args[0]).includes("/api/v1/desktop")) window.__labrackSignaling = this;
      }
    };
  });
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(60_000);
  let lastStats = null;
  page.on("websocket", (ws) =>
    ws.on("framereceived", (frame) => {
      try {
        const msg = JSON.parse(String(frame.payload));
        if (msg.type === "stats") lastStats = msg;
      } catch {}
    }),
  );
  await page.goto(`${BASE_URL}/#/join`);
  await page.fill(tid("join-event-code"), need("LABRACK_EVENT_CODE", BY));
  await page.fill(tid("join-code-input"), need("LABRACK_JOIN_CODE", BY));
  await page.click(tid("join-submit"));
  await page.waitForSelector(tid("open-desktop"));
  await page.click(tid("open-desktop"));
  await page.waitForSelector(`${tid("desktop-status")}[data-state="connected"]`);
  await page.waitForFunction(() => window.__labrackInput?.readyState === "open" && window.__labrackSignaling?.readyState === 1);

  const sent = await page.evaluate(async (secs) => {
    const input = window.__labrackInput;
    const signaling = window.__labrackSignaling;
    // 100 pointer moves per message (5 bytes each), as the wire format allows
    const moves = new Uint8Array(500);
    for (let i = 0; i < 100; i++) {
      const x = (i * 7) % 1200;
      moves.set([3, x & 255, x >> 8, 100, 0], i * 5);
    }
    const clip = "flood ".repeat(10_000);
    const until = performance.now() + secs * 1000;
    let inputSent = 0;
    let clipboardSent = 0;
    let resizeSent = 0;
    while (performance.now() < until) {
      // as fast as the channel drains: keep at most 1 MiB in its buffer
      while (input.bufferedAmount < 1 << 20) {
        input.send(moves);
        inputSent += 100;
      }
      for (let i = 0; i < 20; i++) {
        signaling.send(JSON.stringify({ type: "clipboard", text: `${clip}${clipboardSent}` }));
        clipboardSent++;
        const wide = resizeSent % 2 === 0;
        signaling.send(JSON.stringify({ type: "resize", width: wide ? 3840 : 640, height: wide ? 2160 : 480 }));
        resizeSent++;
      }
      await new Promise((r) => setTimeout(r, 10));
    }
    return { inputSent, clipboardSent, resizeSent };
  }, FLOOD_SECS);
  // the appliance's next stats report what it kept and dropped
  await new Promise((r) => setTimeout(r, 2500));
  const state = await page.getAttribute(tid("desktop-status"), "data-state");
  console.log(
    JSON.stringify({
      input_sent: sent.inputSent,
      clipboard_sent: sent.clipboardSent,
      resize_sent: sent.resizeSent,
      stats: lastStats && {
        input_dropped: lastStats.stream_inputs_dropped,
        inputs_applied: lastStats.inputs_applied,
        resizes: lastStats.resizes,
        resizes_coalesced: lastStats.resizes_coalesced,
        keyframes: lastStats.keyframes,
      },
      state,
    }),
  );
} finally {
  await close();
}
