// Debian's Chromium, headless, for the scripts in this folder: a throwaway profile, the
// appliance's self-signed certificate accepted, no background traffic, and video that may
// play without a user gesture. `close()` ends the browser and removes the profile.

import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

export async function launchChromium(tag, viewport) {
  const userDataDir = await mkdtemp(join(tmpdir(), `labrack-chromium-${tag}-`));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: process.env.CHROMIUM_PATH || "/usr/bin/chromium",
    headless: true,
    ignoreHTTPSErrors: true,
    viewport,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required"],
  });
  const close = async () => {
    await context.close().catch(() => {});
    await rm(userDataDir, { recursive: true, force: true }).catch(() => {});
  };
  return { context, close };
}

/** An environment variable the driving program must set; `by` names that program. */
export function need(name, by = "the lab_hosts Rust test") {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is required (this script is driven by ${by})`);
  return value;
}

/** The CSS selector of a `data-testid`. */
export const tid = (id) => `[data-testid="${id}"]`;
