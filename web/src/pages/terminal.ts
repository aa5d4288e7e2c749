// Full-window browser terminal for a lab: xterm.js over a WebSocket. The single-use
// ticket goes in the first message, never in the URL.

import { FitAddon } from "@xterm/addon-fit";
import { Terminal } from "@xterm/xterm";
import { api } from "../api";
import { errorBox, h, showError } from "../dom";

export function renderTerminal(root: HTMLElement, allocationId: string): void {
  document.title = "Terminal · LabRack";
  const status = h("p", { class: "terminal-status", role: "status", testid: "terminal-status", "data-state": "connecting" }, "Connecting…");
  const error = errorBox("terminal-error");
  const screen = h("div", { class: "terminal-screen", testid: "terminal-screen" });
  root.append(h("div", { class: "terminal-bar" }, h("a", { href: "#/", testid: "terminal-back" }, "← Back"), status), error, screen);

  const term = new Terminal({ cursorBlink: true, fontFamily: "ui-monospace, monospace", fontSize: 14, scrollback: 5000 });
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.open(screen);
  fit.fit();
  const encoder = new TextEncoder();
  let socket: WebSocket | null = null;

  const setStatus = (state: string, text: string): void => {
    status.dataset.state = state;
    status.textContent = text;
  };

  const sendResize = (): void => {
    fit.fit();
    if (socket?.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ type: "resize", cols: term.cols, rows: term.rows }));
  };
  const onResize = (): void => sendResize();
  window.addEventListener("resize", onResize);

  term.onData((data) => {
    if (socket?.readyState === WebSocket.OPEN) socket.send(encoder.encode(data));
  });

  // Leaving the page closes the socket, which closes the SSH channel.
  const watch = window.setInterval(() => {
    if (root.isConnected) return;
    window.clearInterval(watch);
    window.removeEventListener("resize", onResize);
    socket?.close();
    term.dispose();
  }, 500);

  async function connect(): Promise<void> {
    try {
      const ticket = await api.terminalTicket(allocationId);
      const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}${ticket.path}`;
      const ws = new WebSocket(url);
      ws.binaryType = "arraybuffer";
      socket = ws;
      ws.addEventListener("open", () => {
        // The page is in the document by now: size the terminal to it before saying hello.
        fit.fit();
        ws.send(JSON.stringify({ ticket: ticket.ticket, cols: term.cols, rows: term.rows }));
      });
      ws.addEventListener("message", (ev) => {
        if (ev.data instanceof ArrayBuffer) {
          term.write(new Uint8Array(ev.data));
          return;
        }
        const msg = JSON.parse(String(ev.data)) as { type: string; detail?: string; status?: number | null };
        if (msg.type === "ready") {
          setStatus("ready", "Connected");
          term.focus();
        } else if (msg.type === "exit") {
          setStatus("ended", `The shell ended${msg.status !== null && msg.status !== undefined ? ` (status ${msg.status})` : ""}.`);
        } else if (msg.type === "error") {
          setStatus("ended", "Disconnected");
          showError(error, new Error(msg.detail ?? "terminal error"));
        }
      });
      ws.addEventListener("close", () => {
        if (status.dataset.state !== "ended") setStatus("ended", "Disconnected. Reload the page to connect again.");
      });
    } catch (err) {
      setStatus("ended", "Could not connect");
      showError(error, err);
    }
  }
  void connect();
}
