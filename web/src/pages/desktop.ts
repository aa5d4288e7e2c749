// The lab desktop in the browser: WebRTC video (receive-only) plus an "input" data channel.
// Signaling goes over a WebSocket whose first message carries the single-use ticket and the
// offer; nothing secret is ever in a URL. The same socket carries the clipboard both ways and
// the window size (the remote desktop follows it where its server allows). The server drops
// whatever a view-only viewer (staff, judges) sends.

import { api, ApiError } from "../api";
import { errorBox, h, showError } from "../dom";

// KeyboardEvent.code → set-1 scancode (| 0x100 for E0-extended keys).
const SCANCODES: Record<string, number> = {
  Escape: 0x01, Digit1: 0x02, Digit2: 0x03, Digit3: 0x04, Digit4: 0x05, Digit5: 0x06, Digit6: 0x07, Digit7: 0x08,
  Digit8: 0x09, Digit9: 0x0a, Digit0: 0x0b, Minus: 0x0c, Equal: 0x0d, Backspace: 0x0e, Tab: 0x0f, KeyQ: 0x10,
  KeyW: 0x11, KeyE: 0x12, KeyR: 0x13, KeyT: 0x14, KeyY: 0x15, KeyU: 0x16, KeyI: 0x17, KeyO: 0x18, KeyP: 0x19,
  BracketLeft: 0x1a, BracketRight: 0x1b, Enter: 0x1c, ControlLeft: 0x1d, KeyA: 0x1e, KeyS: 0x1f, KeyD: 0x20,
  KeyF: 0x21, KeyG: 0x22, KeyH: 0x23, KeyJ: 0x24, KeyK: 0x25, KeyL: 0x26, Semicolon: 0x27, Quote: 0x28,
  Backquote: 0x29, ShiftLeft: 0x2a, Backslash: 0x2b, KeyZ: 0x2c, KeyX: 0x2d, KeyC: 0x2e, KeyV: 0x2f, KeyB: 0x30,
  KeyN: 0x31, KeyM: 0x32, Comma: 0x33, Period: 0x34, Slash: 0x35, ShiftRight: 0x36, NumpadMultiply: 0x37,
  AltLeft: 0x38, Space: 0x39, CapsLock: 0x3a, F1: 0x3b, F2: 0x3c, F3: 0x3d, F4: 0x3e, F5: 0x3f, F6: 0x40, F7: 0x41,
  F8: 0x42, F9: 0x43, F10: 0x44, F11: 0x57, F12: 0x58, ControlRight: 0x11d, AltRight: 0x138, Home: 0x147,
  ArrowUp: 0x148, PageUp: 0x149, ArrowLeft: 0x14b, ArrowRight: 0x14d, End: 0x14f, ArrowDown: 0x150,
  PageDown: 0x151, Insert: 0x152, Delete: 0x153, MetaLeft: 0x15b, MetaRight: 0x15c, ContextMenu: 0x15d,
  IntlBackslash: 0x56,
};

function keyMessage(code: number, down: boolean): Uint8Array<ArrayBuffer> {
  return new Uint8Array([1, (down ? 1 : 0) | (code & 0x100 ? 2 : 0), code & 0xff]);
}

// Text the scancode table cannot type (other layouts, composed characters): Unicode events.
function unicodeMessages(text: string): Uint8Array<ArrayBuffer> {
  const bytes = new Uint8Array(text.length * 8);
  for (let i = 0; i < text.length; i += 1) {
    const unit = text.charCodeAt(i);
    bytes.set([2, 1, unit & 0xff, unit >> 8, 2, 0, unit & 0xff, unit >> 8], i * 8);
  }
  return bytes;
}

function u16(view: DataView, at: number, value: number): void {
  view.setUint16(at, Math.max(0, Math.min(0xffff, Math.round(value))), true);
}

export function renderDesktop(root: HTMLElement, allocationId: string): void {
  document.title = "Desktop · LabRack";
  const status = h("p", { class: "terminal-status", role: "status", testid: "desktop-status", "data-state": "connecting" }, "Connecting…");
  const statsLine = h("p", { class: "muted small", testid: "desktop-stats" });
  const error = errorBox("desktop-error");
  const video = h("video", { class: "desktop-video", testid: "desktop-video", autoplay: true, muted: true, playsinline: true, tabindex: 0 });
  video.muted = true;
  // The clipboard panel: what the desktop copied lands here (and in the browser's clipboard
  // where the browser allows); "Send to desktop" puts text on the desktop's clipboard.
  const clipText = h("textarea", { class: "code", rows: 3, testid: "desktop-clipboard", placeholder: "Text copied on the desktop shows here; type or paste text to send it there." });
  const clipNote = h("span", { class: "muted small", testid: "desktop-clipboard-note" });
  const clipSend = h("button", { type: "button", testid: "desktop-clipboard-send" }, "Send to desktop");
  const clipPanel = h("div", { class: "desktop-clipboard", hidden: true }, clipText, h("div", {}, clipSend, " ", clipNote));
  const clipToggle = h("button", { type: "button", class: "secondary", testid: "desktop-clipboard-toggle" }, "Clipboard");
  const lockButton = h("button", { type: "button", class: "secondary", testid: "desktop-pointer-lock", title: "Capture the mouse (Esc releases it)" }, "Lock pointer");
  const fullButton = h("button", { type: "button", class: "secondary", testid: "desktop-fullscreen", title: "Full screen; shortcuts such as Ctrl+W go to the desktop (hold Esc to leave)" }, "Full screen");
  root.append(h("div", { class: "terminal-bar" }, h("a", { href: "#/", testid: "desktop-back" }, "← Back"), status, statsLine, clipToggle, lockButton, fullButton), clipPanel, error, video);
  // In full screen, the Keyboard Lock API (Chromium) hands the desktop the shortcuts the
  // browser would otherwise take (Ctrl+W, Ctrl+T, Esc); elsewhere plain full screen.
  fullButton.addEventListener("click", () => {
    video.focus();
    void video.requestFullscreen?.().then(() => {
      const keyboard = (navigator as Navigator & { keyboard?: { lock?: () => Promise<void> } }).keyboard;
      return keyboard?.lock?.();
    }).catch(() => {});
  });

  let pc: RTCPeerConnection | null = null;
  let socket: WebSocket | null = null;
  let channel: RTCDataChannel | null = null;
  let interactive = false;
  let codecName = "";
  let lastFrames = 0;
  let lastAt = performance.now();
  const setStatus = (state: string, text: string): void => {
    status.dataset.state = state;
    status.textContent = text;
  };
  // View-only viewers send too: the server is the one that decides, drops and counts it.
  const send = (message: Uint8Array<ArrayBuffer>): void => {
    if (channel?.readyState === "open") channel.send(message);
  };
  const signal = (message: object): void => {
    if (socket?.readyState === WebSocket.OPEN) socket.send(JSON.stringify(message));
  };
  const sendClipboard = (text: string): void => {
    signal({ type: "clipboard", text });
    clipNote.textContent = interactive ? "Sent to the desktop." : "View only: the desktop's clipboard is not changed.";
  };
  clipToggle.addEventListener("click", () => {
    clipPanel.hidden = !clipPanel.hidden;
  });
  clipSend.addEventListener("click", () => sendClipboard(clipText.value));
  const remoteCopied = (text: string): void => {
    clipText.value = text;
    clipNote.textContent = "Copied on the desktop.";
    // Needs focus and a secure context; the panel has the text either way.
    void navigator.clipboard?.writeText(text).catch(() => {});
  };

  // The remote desktop follows the video area's size (CSS pixels), once it settles.
  const videoSize = (): [number, number] => {
    const rect = video.getBoundingClientRect();
    return [Math.max(200, Math.min(3840, Math.floor(rect.width) & ~1)), Math.max(200, Math.min(2160, Math.floor(rect.height)))];
  };
  let lastSize = "";
  let lastAskAt = 0;
  let resizeTimer = 0;
  const requestSize = (): void => {
    window.clearTimeout(resizeTimer);
    resizeTimer = window.setTimeout(() => {
      if (!interactive || !root.isConnected) return;
      const [width, height] = videoSize();
      // A few pixels are not worth a remote resize (the picture is scaled by that little).
      const near = (w: number, h: number): boolean => Math.abs(width - w) < 16 && Math.abs(height - h) < 16;
      const [lastW, lastH] = lastSize ? lastSize.split("x").map(Number) : [0, 0];
      // Asked already, and the picture has that size (or the ask is recent): nothing to do.
      const showing = video.videoWidth === 0 || near(video.videoWidth, video.videoHeight);
      if ((near(lastW, lastH) && (showing || performance.now() - lastAskAt < 3000)) || socket?.readyState !== WebSocket.OPEN) return;
      lastSize = `${width}x${height}`;
      lastAskAt = performance.now();
      signal({ type: "resize", width, height });
    }, 400);
  };
  const sizeWatch = new ResizeObserver(requestSize);
  sizeWatch.observe(video);
  // The picture changed size (first frame, another viewer's window): check it fits ours.
  video.addEventListener("resize", requestSize);

  // Pointer lock: the mouse moves a desktop cursor by relative motion until Esc.
  let locked: [number, number] | null = null;
  lockButton.addEventListener("click", () => {
    video.focus();
    void video.requestPointerLock?.();
  });
  document.addEventListener("pointerlockchange", () => {
    locked = document.pointerLockElement === video ? [video.videoWidth / 2, video.videoHeight / 2] : null;
  });

  // Desktop pixel under a point of the video element (letterboxing accounted for).
  const toDesktop = (ev: MouseEvent): [number, number] => {
    const rect = video.getBoundingClientRect();
    const vw = video.videoWidth || 1;
    const vh = video.videoHeight || 1;
    const scale = Math.min(rect.width / vw, rect.height / vh);
    const offsetX = (rect.width - vw * scale) / 2;
    const offsetY = (rect.height - vh * scale) / 2;
    return [(ev.clientX - rect.left - offsetX) / scale, (ev.clientY - rect.top - offsetY) / scale];
  };
  const pointer = (type: number, ev: MouseEvent, extra: number[] = []): Uint8Array<ArrayBuffer> => {
    if (locked && type === 3) {
      locked = [
        Math.max(0, Math.min(video.videoWidth - 1, locked[0] + ev.movementX)),
        Math.max(0, Math.min(video.videoHeight - 1, locked[1] + ev.movementY)),
      ];
    }
    const [x, y] = locked ?? toDesktop(ev);
    const bytes = new Uint8Array(type === 3 ? 5 : 7);
    const view = new DataView(bytes.buffer);
    bytes[0] = type;
    if (type === 3) {
      u16(view, 1, x);
      u16(view, 3, y);
    } else {
      bytes[1] = extra[0];
      bytes[2] = extra[1];
      if (type === 5) view.setInt16(1, extra[0], true);
      u16(view, 3, x);
      u16(view, 5, y);
    }
    return bytes;
  };
  video.addEventListener("mousemove", (ev) => send(pointer(3, ev)));
  video.addEventListener("mousedown", (ev) => {
    ev.preventDefault();
    video.focus();
    send(pointer(4, ev, [[0, 1, 2][ev.button] ?? 0, 1]));
  });
  video.addEventListener("mouseup", (ev) => send(pointer(4, ev, [[0, 1, 2][ev.button] ?? 0, 0])));
  video.addEventListener("contextmenu", (ev) => ev.preventDefault());
  video.addEventListener("wheel", (ev) => {
    ev.preventDefault();
    send(pointer(5, ev, [Math.max(-255, Math.min(255, Math.round(-ev.deltaY)))]));
  }, { passive: false });
  // Ctrl+V / Cmd+V: the browser's paste event carries its clipboard; that text goes to the
  // desktop's clipboard first, then the V key, so the desktop pastes what the user copied.
  let pasteKey: number | null = null;
  let pasteTimer = 0;
  const releasePasteKey = (): void => {
    window.clearTimeout(pasteTimer);
    if (pasteKey !== null) send(keyMessage(pasteKey, true));
    pasteKey = null;
  };
  const onPaste = (ev: ClipboardEvent): void => {
    if (!root.isConnected || document.activeElement === clipText) return;
    const text = ev.clipboardData?.getData("text/plain") ?? "";
    if (text && pasteKey !== null) {
      ev.preventDefault();
      sendClipboard(text);
    }
    releasePasteKey();
  };
  const onKey = (down: boolean) => (ev: KeyboardEvent): void => {
    if (!root.isConnected || ev.target === clipText) return;
    const code = SCANCODES[ev.code];
    if (code === undefined) {
      // A character the scancode table cannot type goes as Unicode (key down only).
      if (down && [...ev.key].length === 1 && !ev.ctrlKey && !ev.metaKey) {
        if (interactive) ev.preventDefault();
        send(unicodeMessages(ev.key));
      }
      return;
    }
    if (down && code === SCANCODES.KeyV && (ev.ctrlKey || ev.metaKey) && interactive) {
      // Let the browser fire its paste event; the key follows it (or 200 ms later).
      pasteKey = code;
      pasteTimer = window.setTimeout(releasePasteKey, 200);
      return;
    }
    if (!down && pasteKey !== null && code === pasteKey) releasePasteKey();
    // Keep shortcuts (Tab, Backspace, Ctrl+W where the browser allows) for the desktop.
    if (interactive) ev.preventDefault();
    send(keyMessage(code, down));
  };
  const keydown = onKey(true);
  const keyup = onKey(false);
  window.addEventListener("keydown", keydown);
  window.addEventListener("keyup", keyup);
  window.addEventListener("paste", onPaste);

  const watch = window.setInterval(() => {
    if (root.isConnected) return;
    window.clearInterval(watch);
    window.removeEventListener("keydown", keydown);
    window.removeEventListener("keyup", keyup);
    window.removeEventListener("paste", onPaste);
    sizeWatch.disconnect();
    window.clearTimeout(resizeTimer);
    window.clearTimeout(reconnectTimer);
    window.clearInterval(statsTimer);
    const [oldSocket, oldPc] = [socket, pc];
    socket = null;
    pc = null;
    oldSocket?.close();
    oldPc?.close();
  }, 500);

  let attempt = 0;
  let reconnectTimer = 0;
  let statsTimer = 0;
  // A dropped connection (appliance restart, Wi-Fi blip) is retried with a fresh ticket:
  // 1 s, 2 s, 4 s … up to 15 s; only leaving the page stops it.
  const scheduleReconnect = (why: string): void => {
    if (!root.isConnected || reconnectTimer) return;
    socket?.close();
    pc?.close();
    socket = null;
    pc = null;
    const wait = Math.min(15_000, 1000 * 2 ** Math.min(attempt, 4));
    attempt += 1;
    setStatus("reconnecting", `${why} Reconnecting in ${Math.round(wait / 1000)} s…`);
    reconnectTimer = window.setTimeout(() => {
      reconnectTimer = 0;
      void connect();
    }, wait);
  };

  // Round-trip time and decode time from the browser's own statistics.
  const sampleStats = async (peer: RTCPeerConnection, sent: string): Promise<void> => {
    let rtt = "";
    let decode = "";
    let fps = "";
    (await peer.getStats()).forEach((report: Record<string, unknown>) => {
      if (report.type === "candidate-pair" && report.nominated && typeof report.currentRoundTripTime === "number") {
        rtt = `${(report.currentRoundTripTime * 1000).toFixed(0)} ms RTT`;
      }
      if (report.type === "inbound-rtp" && report.kind === "video") {
        const decoded = Number(report.framesDecoded ?? 0);
        const total = Number(report.totalDecodeTime ?? 0);
        if (decoded > 0) decode = `${((total / decoded) * 1000).toFixed(1)} ms decode`;
        if (typeof report.framesPerSecond === "number") fps = `${report.framesPerSecond.toFixed(0)} fps`;
      }
    });
    statsLine.textContent = [codecName, fps, sent, rtt, decode].filter(Boolean).join(" · ");
  };

  async function connect(): Promise<void> {
    let sent = "";
    try {
      const ticket = await api.desktopTicket(allocationId);
      if (!root.isConnected) return;
      interactive = ticket.mode === "interactive";
      const peer = new RTCPeerConnection({ iceServers: [] });
      pc = peer;
      peer.addTransceiver("video", { direction: "recvonly" });
      channel = peer.createDataChannel("input");
      channel.binaryType = "arraybuffer";
      peer.addEventListener("track", (ev) => {
        video.srcObject = ev.streams[0] ?? new MediaStream([ev.track]);
        void video.play().catch(() => {});
      });
      peer.addEventListener("connectionstatechange", () => {
        if (peer !== pc) return;
        if (peer.connectionState === "connected") {
          attempt = 0;
          setStatus("connected", interactive ? "Connected" : "Connected (view only)");
        }
        if (peer.connectionState === "disconnected") setStatus("reconnecting", "Connection interrupted…");
        if (peer.connectionState === "failed") scheduleReconnect("The connection failed.");
      });
      await peer.setLocalDescription(await peer.createOffer());
      await new Promise<void>((resolve) => {
        if (peer.iceGatheringState === "complete") return resolve();
        peer.addEventListener("icegatheringstatechange", () => {
          if (peer.iceGatheringState === "complete") resolve();
        });
        setTimeout(resolve, 2000);
      });
      const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}${ticket.path}`);
      socket = ws;
      ws.addEventListener("open", () => {
        const [width, height] = videoSize();
        ws.send(JSON.stringify({ ticket: ticket.ticket, offer: peer.localDescription?.sdp ?? "", width, height }));
        if (interactive) {
          lastSize = `${width}x${height}`;
          lastAskAt = performance.now();
        }
      });
      ws.addEventListener("message", (ev) => {
        const msg = JSON.parse(String(ev.data)) as {
          type: string; sdp?: string; detail?: string; frames?: number; bytes?: number; text?: string; encoder_bps?: number; fraction_lost?: number; codec?: string;
        };
        if (msg.type === "answer" && msg.sdp) {
          codecName = msg.codec ?? "";
          void peer.setRemoteDescription({ type: "answer", sdp: msg.sdp });
          // A stream that was already running (another viewer's) may have another size.
          requestSize();
        } else if (msg.type === "clipboard" && typeof msg.text === "string") {
          remoteCopied(msg.text);
        } else if (msg.type === "rejected") {
          clipNote.textContent = msg.detail ?? "The appliance refused that.";
        } else if (msg.type === "stats") {
          const now = performance.now();
          const fps = ((msg.frames ?? 0) - lastFrames) / ((now - lastAt) / 1000);
          lastFrames = msg.frames ?? 0;
          lastAt = now;
          const lost = msg.fraction_lost ? `, ${((msg.fraction_lost / 256) * 100).toFixed(0)} % lost` : "";
          sent = `${fps.toFixed(0)} fps sent, ${(((msg.bytes ?? 0) * 8) / 1e6).toFixed(1)} Mbit, aiming at ${((msg.encoder_bps ?? 0) / 1e6).toFixed(1)} Mbit/s${lost}`;
          void sampleStats(peer, sent);
        } else if (msg.type === "restart") {
          scheduleReconnect("The lab was reset.");
        } else if (msg.type === "error") {
          setStatus("ended", "Could not open the desktop");
          showError(error, new Error(msg.detail ?? "desktop error"));
          ws.close();
        }
      });
      // The appliance went away (restart, network): start over with a new ticket.
      ws.addEventListener("close", () => {
        if (ws === socket && status.dataset.state !== "ended") scheduleReconnect("The appliance connection dropped.");
      });
      window.clearInterval(statsTimer);
      statsTimer = window.setInterval(() => {
        if (!root.isConnected || peer !== pc) return window.clearInterval(statsTimer);
        void sampleStats(peer, sent);
      }, 2000);
    } catch (err) {
      // 409: the lab is busy (a reset is under way) — try again shortly.
      if (err instanceof ApiError && err.status >= 400 && err.status < 500 && ![408, 409, 429].includes(err.status)) {
        setStatus("ended", "Could not open the desktop");
        showError(error, err);
      } else {
        scheduleReconnect("The appliance cannot be reached.");
      }
    }
  }
  void connect();
}
