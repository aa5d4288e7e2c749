// End-to-end browser test of the LabRack UI against a running server.
//
//   LABRACK_URL=https://127.0.0.1:8443 LABRACK_ADMIN_PASSWORD=... npm run test:browser
//
// Env:
//   LABRACK_URL              base URL of the server (required)
//   LABRACK_ADMIN_PASSWORD   one-time password of the initial `admin` user (required)
//   LABRACK_SCREENSHOT_DIR   optional; a PNG per step is written there
//   CHROMIUM_PATH            optional; defaults to /usr/bin/chromium (Debian package)
//
// The admin must still have `must_change_password: true` (fresh data dir): the test
// logs in with the one-time password and is forced to choose a new one.

import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtemp, mkdir, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const BASE_URL = (process.env.LABRACK_URL ?? "").replace(/\/+$/, "");
const ADMIN_PASSWORD = process.env.LABRACK_ADMIN_PASSWORD ?? "";
const SCREENSHOT_DIR = process.env.LABRACK_SCREENSHOT_DIR ?? "";
const CHROMIUM = process.env.CHROMIUM_PATH || "/usr/bin/chromium";

// Refuse to run half-configured rather than skip: `cargo xtask test` always sets both.
if (!BASE_URL || !ADMIN_PASSWORD) {
  throw new Error(
    "set LABRACK_URL and LABRACK_ADMIN_PASSWORD (a fresh `labrack serve`), or run `cargo xtask test`",
  );
}

const tid = (id) => `[data-testid="${id}"]`;

/** `YYYY-MM-DDTHH:00` for `daysAhead` days from today at `hour` o'clock, local time. */
function localInput(daysAhead, hour) {
  const d = new Date();
  d.setDate(d.getDate() + daysAhead);
  const p = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(hour)}:00`;
}

test("staff set-up and participant join, end to end", { timeout: 180_000 }, async (t) => {
  const userDataDir = await mkdtemp(join(tmpdir(), "labrack-chromium-"));
  if (SCREENSHOT_DIR) await mkdir(SCREENSHOT_DIR, { recursive: true });

  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    headless: true,
    ignoreHTTPSErrors: true,
    viewport: { width: 1280, height: 900 },
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  t.after(async () => {
    await context.close().catch(() => {});
    await rm(userDataDir, { recursive: true, force: true }).catch(() => {});
  });

  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(15_000);

  // Diagnostics: uncaught page errors fail the test; console output is kept for failure reports.
  const pageErrors = [];
  const consoleLines = [];
  page.on("pageerror", (err) => pageErrors.push(String(err)));
  page.on("console", (msg) => consoleLines.push(`[${msg.type()}] ${msg.text()}`));

  // Record every request so we can check the "no secrets in URLs" and CSRF rules at the end.
  const requests = [];
  page.on("request", (req) => {
    requests.push({ url: req.url(), method: req.method(), headers: req.headers() });
  });

  let shot = 0;
  const screenshot = async (name) => {
    if (!SCREENSHOT_DIR) return;
    shot += 1;
    const file = join(SCREENSHOT_DIR, `${String(shot).padStart(2, "0")}-${name}.png`);
    await page.screenshot({ path: file, fullPage: true });
  };

  const hashIs = (hash) => page.waitForFunction((h) => location.hash === h, hash);

  try {
    const stamp = Date.now().toString(36);
    const newPassword = `browser-test-${stamp}-pw!`;
    const eventName = `Browser Test Hack ${stamp}`;

    // ---- landing: no session -> login page --------------------------------------
    await page.goto(`${BASE_URL}/`);
    await hashIs("#/login");
    await page.locator(tid("login-form")).waitFor();
    // The connection card for the staff console: the CA fingerprint labrack serve printed,
    // and a QR code of it that the browser renders.
    await page.locator(tid("appliance-fingerprint")).waitFor();
    assert.equal((await page.textContent(tid("appliance-fingerprint"))).trim(), process.env.LABRACK_CA_FINGERPRINT);
    assert.equal((await page.textContent(tid("appliance-url"))).trim(), BASE_URL);
    const card = await page.evaluate(() => fetch("/api/v1/appliance").then((r) => r.json()));
    assert.equal(card.url, BASE_URL, "the appliance names the URL the browser used");
    const qrWidth = await page.locator(tid("appliance-qr")).evaluate((img) => img.decode().then(() => img.naturalWidth));
    assert.ok(qrWidth >= 200, `the QR code renders (${qrWidth} px)`);
    await screenshot("login");

    // A wrong password shows an error and keeps us on the login page.
    await page.fill(tid("login-username"), "admin");
    await page.fill(tid("login-password"), `${ADMIN_PASSWORD}-wrong`);
    await page.click(tid("login-submit"));
    await page.locator(tid("login-error")).waitFor({ state: "visible" });
    assert.notEqual((await page.textContent(tid("login-error"))).trim(), "");
    assert.equal(await page.evaluate(() => location.hash), "#/login");
    await screenshot("login-error");

    // ---- log in with the one-time password -> forced password change ------------
    await page.fill(tid("login-username"), "admin");
    await page.fill(tid("login-password"), ADMIN_PASSWORD);
    await page.click(tid("login-submit"));
    await hashIs("#/password");
    await page.locator(tid("must-change-notice")).waitFor();
    await screenshot("forced-password-change");

    // Trying to go elsewhere keeps us on the password page.
    await page.evaluate(() => (location.hash = "#/events"));
    await hashIs("#/password");
    await page.locator(tid("password-form")).waitFor();

    await page.fill(tid("current-password"), ADMIN_PASSWORD);
    await page.fill(tid("new-password"), newPassword);
    await page.fill(tid("confirm-password"), newPassword);
    await page.click(tid("password-submit"));
    await hashIs("#/events");
    await page.locator(tid("event-create-form")).waitFor();
    assert.match(await page.textContent(tid("whoami")), /admin/);
    await screenshot("events-empty");

    // ---- create an event -------------------------------------------------------------
    await page.fill(tid("event-name"), eventName);
    // Schedule relative to now (local time, as a datetime-local input expects it).
    await page.fill(tid("event-starts"), localInput(1, 9));
    await page.fill(tid("event-ends"), localInput(2, 17));
    await page.click(tid("event-create-submit"));
    const eventRow = page.locator(tid("event-row"), { hasText: eventName });
    await eventRow.waitFor();
    await eventRow.locator(`${tid("event-row-state")}[data-state="draft"]`).waitFor();
    await screenshot("events-created");

    // ---- open it ---------------------------------------------------------------------
    await eventRow.locator(tid("event-link")).click();
    await page.waitForFunction(() => /^#\/events\/[^/]+$/.test(location.hash));
    const eventHash = await page.evaluate(() => location.hash);
    await page.locator(tid("event-code")).waitFor();
    const eventCode = (await page.textContent(tid("event-code"))).trim();
    assert.ok(eventCode.length > 0, "event code is shown");
    assert.equal((await page.textContent(tid("page-title"))).trim(), eventName);
    assert.equal(await page.getAttribute(tid("event-state"), "data-state"), "draft");
    // Only the legal transition from draft is offered.
    assert.equal(await page.locator(tid("transition-live")).count(), 1);
    assert.equal(await page.locator(tid("transition-frozen")).count(), 0);
    assert.equal(await page.locator(tid("transition-archived")).count(), 0);
    await screenshot("event-new");

    // ---- create a team ---------------------------------------------------------------
    await page.fill(tid("team-name-input"), "Manual Mavericks");
    await page.click(tid("team-create-submit"));
    await page.locator(tid("team-row"), { hasText: "Manual Mavericks" }).waitFor();

    // ---- bad CSV: row errors listed, nothing imported ------------------------------
    // line 1 header, line 2 valid, line 3 empty name, line 4 too many columns
    const badCsv = [
      "team,name,email",
      "Rocket Owls,Ada Lovelace,ada@example.com",
      "Rocket Owls,,nobody@example.com",
      "Byte Bakers,Linus Pauling,linus@example.com,extra",
      "",
    ].join("\n");
    await page.fill(tid("csv-text"), badCsv);
    await page.click(tid("csv-import-submit"));
    const errorsTable = page.locator(tid("csv-errors"));
    await errorsTable.waitFor();
    const lines = (await errorsTable.locator(tid("csv-error-line")).allTextContents()).map((s) => Number(s.trim()));
    assert.deepEqual(lines, [3, 4], `row errors at lines 3 and 4, got ${JSON.stringify(lines)}`);
    for (const reason of await errorsTable.locator(tid("csv-error-reason")).allTextContents()) {
      assert.notEqual(reason.trim(), "", "each row error has a reason");
    }
    assert.equal(await page.locator(tid("import-results")).count(), 0);
    await screenshot("csv-errors");

    // Reload from the server: still no participants, no new teams (import is all-or-nothing).
    await page.reload();
    await page.locator(tid("participants-list")).locator(`${tid("participants-empty")}, ${tid("participants-table")}`).first().waitFor();
    assert.equal(await page.locator(tid("participant-row")).count(), 0, "bad CSV imported nothing");
    assert.equal(await page.locator(tid("participants-empty")).count(), 1);
    assert.equal(await page.locator(tid("team-row")).count(), 1, "bad CSV created no teams");

    // ---- good CSV: 2 teams, 3 participants ---------------------------------------
    const goodCsv = [
      "team,name,email",
      "Rocket Owls,Ada Lovelace,ada@example.com",
      "Rocket Owls,Grace Hopper,",
      "Byte Bakers,Linus Pauling,linus@example.com",
      "",
    ].join("\n");
    await page.fill(tid("csv-text"), goodCsv);
    await page.click(tid("csv-import-submit"));
    const results = page.locator(tid("import-results"));
    await results.waitFor();
    assert.equal(await page.locator(tid("csv-errors")).count(), 0);
    assert.equal(await results.locator(tid("join-code")).count(), 3, "three join codes shown");
    const summary = await page.textContent(tid("import-summary"));
    assert.match(summary, /3 participants/);
    assert.match(summary, /2 new teams/);
    const adaRow = results.locator(tid("join-code-row"), { hasText: "Ada Lovelace" });
    assert.equal((await adaRow.locator(tid("join-code-team")).textContent()).trim(), "Rocket Owls");
    const joinCode = (await adaRow.locator(tid("join-code")).textContent()).trim();
    assert.ok(joinCode.length > 0, "join code is shown");
    // The participants and teams lists refresh separately after an import: wait for both.
    await page.locator(tid("participant-row")).nth(2).waitFor();
    await page.locator(tid("team-row")).nth(2).waitFor();
    assert.equal(await page.locator(tid("participant-row")).count(), 3);
    assert.equal(await page.locator(tid("team-row")).count(), 3);
    await screenshot("csv-imported");

    // ---- go live ---------------------------------------------------------------------
    await page.click(tid("transition-live"));
    await page.locator(`${tid("event-state")}[data-state="live"]`).waitFor();
    assert.equal(await page.locator(tid("transition-frozen")).count(), 1);
    assert.equal(await page.locator(tid("transition-ended")).count(), 1);
    assert.equal(await page.locator(tid("transition-live")).count(), 0);
    await screenshot("event-live");

    // The event list reflects the new state and counts.
    await page.click(tid("nav-events"));
    await hashIs("#/events");
    const liveRow = page.locator(tid("event-row"), { hasText: eventName });
    await liveRow.locator(`${tid("event-row-state")}[data-state="live"]`).waitFor();

    // ---- lab templates, hosts, and the event's Labs card ---------------------------------
    await page.click(tid("nav-templates"));
    await hashIs("#/templates");
    await page.fill(tid("templates-source"), '[[template]]\nname = "desk"\nruntime = "vm"\nskeleton = "relative"\n');
    await page.click(tid("templates-save"));
    await page.locator(tid("template-error")).first().waitFor();
    const templateErrors = await page.locator(tid("template-error")).allTextContents();
    assert.ok(templateErrors.some((e) => e.startsWith("Line 3")), `runtime error on line 3: ${templateErrors}`);
    assert.ok(templateErrors.some((e) => e.startsWith("Line 4")), `skeleton error on line 4: ${templateErrors}`);
    await screenshot("templates-errors");
    await page.fill(tid("templates-source"), '[[template]]\nname = "desk"\nruntime = "local-user"\nskeleton = "/srv/labrack/skel/desk"\n');
    await page.click(tid("templates-save"));
    await page.locator(tid("template-row")).first().waitFor();
    assert.match(await page.textContent(tid("templates-status")), /Saved 1 template/);
    assert.equal(await page.locator(tid("template-error")).count(), 0);

    await page.click(tid("nav-hosts"));
    await hashIs("#/hosts");
    await page.locator(tid("no-hosts")).waitFor();
    await page.click(tid("token-create"));
    const enrolmentToken = (await page.textContent(tid("token-value"))).trim();
    assert.match(enrolmentToken, /^lrh_/);
    await screenshot("hosts-token");

    await page.evaluate((h) => (location.hash = h), eventHash);
    await page.locator(tid("labs-section")).waitFor();
    await page.locator(`${tid("lab-team")} option`).first().waitFor({ state: "attached" });
    await page.locator(`${tid("lab-template")} option[value="desk"]`).waitFor({ state: "attached" });
    await page.click(tid("lab-allocate"));
    await page.locator(`${tid("labs-error")}:visible`).waitFor();
    assert.match(await page.textContent(tid("labs-error")), /no lab host is enrolled/);
    assert.equal(await page.locator(tid("no-labs")).count(), 1, "a refused allocation creates nothing");
    await screenshot("labs-no-host");

    // ---- log out -----------------------------------------------------------------------
    await page.click(tid("logout"));
    await hashIs("#/login");
    await page.locator(tid("login-form")).waitFor();
    assert.equal(await page.locator(tid("whoami")).count(), 0);
    const sessionStatus = await page.evaluate(() =>
      fetch("/api/v1/auth/session", { credentials: "same-origin" }).then((r) => r.status),
    );
    assert.equal(sessionStatus, 401, "server-side session ended by logout");
    // The session is really gone: staff pages bounce back to the login page.
    await page.evaluate((h) => (location.hash = h), eventHash);
    await hashIs("#/login");

    // ---- participant joins -------------------------------------------------------------
    await page.click(tid("join-link"));
    await hashIs("#/join");
    await page.locator(tid("join-form")).waitFor();
    await screenshot("join");
    await page.fill(tid("join-event-code"), eventCode);
    await page.fill(tid("join-code-input"), joinCode);
    await page.click(tid("join-submit"));
    await hashIs("#/me");
    const teamName = page.locator(tid("team-name"));
    await teamName.waitFor();
    assert.equal((await teamName.textContent()).trim(), "Rocket Owls");
    assert.equal((await page.textContent(tid("me-event-name"))).trim(), eventName);
    assert.equal(await page.getAttribute(tid("event-state"), "data-state"), "live");
    const mates = await page.locator(tid("teammate-name")).allTextContents();
    assert.ok(mates.some((m) => m.includes("Grace Hopper")), `teammates include Grace Hopper: ${mates}`);
    assert.ok(!mates.some((m) => m.includes("Linus Pauling")), "other teams are not listed");
    await screenshot("participant-home");

    // A reload recovers the participant session from the cookie.
    await page.reload();
    await hashIs("#/me");
    await page.locator(tid("team-name")).waitFor();

    // Narrow viewport still works (no horizontal overflow of the page body).
    await page.setViewportSize({ width: 360, height: 740 });
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - document.documentElement.clientWidth);
    assert.ok(overflow <= 1, `no horizontal scrolling at 360px (overflow ${overflow}px)`);
    await screenshot("participant-home-narrow");

    // ---- security rules observed in traffic ------------------------------------------
    for (const r of requests) {
      assert.ok(!r.url.includes(joinCode), `join code must never appear in a URL: ${r.url}`);
      assert.ok(!r.url.includes(enrolmentToken), `enrolment token must never appear in a URL: ${r.url}`);
      assert.ok(!r.url.includes(ADMIN_PASSWORD) && !r.url.includes(newPassword), `password in URL: ${r.url}`);
      assert.ok(!/csrf/i.test(r.url), `CSRF token must not be in a URL: ${r.url}`);
    }
    const unauthenticatedPosts = new Set(["/api/v1/auth/login", "/api/v1/join"]);
    for (const r of requests) {
      const path = new URL(r.url).pathname;
      if (!path.startsWith("/api/") || r.method === "GET" || unauthenticatedPosts.has(path)) continue;
      assert.ok(r.headers["x-csrf-token"], `${r.method} ${path} must send X-CSRF-Token`);
    }

    assert.deepEqual(pageErrors, [], "no uncaught errors in the page");
  } catch (err) {
    await screenshot("failure").catch(() => {});
    if (consoleLines.length) console.error(`browser console:\n${consoleLines.join("\n")}`);
    if (pageErrors.length) console.error(`page errors:\n${pageErrors.join("\n")}`);
    throw err;
  }
});
