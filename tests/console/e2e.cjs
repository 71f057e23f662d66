// Clicks through the web console in headless Chromium the way an admin would, against
// the real coordinator that tests/tests/console.rs starts (it checks the mail at the
// target afterwards). Screenshots go to $SHOTS. Everything is found by its label or its
// role, as a screen reader would find it.
//
// Environment: BASE_URL, TOKEN, SOURCE_PORT, TARGET_PORT, MASTER_USER, MASTER_PASSWORD,
// ALICE_PASSWORD, BOB_PASSWORD, SHOTS, NODE_MODULES (where playwright-core is).
"use strict";
const path = require("path");
const { chromium } = require(path.join(process.env.NODE_MODULES, "playwright-core"));

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
};

async function shot(page, name) {
  await page.screenshot({ path: path.join(env("SHOTS"), `${name}.png`), fullPage: true });
}

/** Every form control has a name a screen reader can say. */
async function assertLabelled(page, where) {
  const unlabelled = await page.evaluate(() =>
    [...document.querySelectorAll("input, select, textarea, button")]
      .filter((el) => !el.closest("[hidden]"))
      .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute("aria-label") && !(el.textContent || "").trim())
      .map((el) => el.outerHTML.slice(0, 120)));
  if (unlabelled.length) throw new Error(`${where}: controls without a label: ${unlabelled.join(" | ")}`);
}

/** Text contrast at least 4.5:1 (WCAG AA) against the background it sits on. */
async function assertContrast(page, where) {
  const poor = await page.evaluate(() => {
    const rgb = (c) => (c.match(/[\d.]+/g) || []).map(Number);
    const lum = ([r, g, b]) => {
      const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
      return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
    };
    const background = (el) => {
      for (let e = el; e; e = e.parentElement) {
        const c = rgb(getComputedStyle(e).backgroundColor);
        if (c.length === 3 || (c.length === 4 && c[3] > 0.9)) return c.slice(0, 3);
      }
      return [255, 255, 255];
    };
    const out = [];
    for (const el of document.querySelectorAll("body *")) {
      const text = [...el.childNodes].filter((n) => n.nodeType === 3).map((n) => n.textContent.trim()).join("");
      if (!text || !el.getClientRects().length || getComputedStyle(el).visibility === "hidden") continue;
      if (el.closest(".visually-hidden, .skip")) continue;
      const fg = lum(rgb(getComputedStyle(el).color).slice(0, 3));
      const bg = lum(background(el));
      const ratio = (Math.max(fg, bg) + 0.05) / (Math.min(fg, bg) + 0.05);
      if (ratio < 4.5) out.push(`${text.slice(0, 40)} (${ratio.toFixed(2)}:1)`);
    }
    return out;
  });
  if (poor.length) throw new Error(`${where}: text below 4.5:1 contrast: ${poor.join(" | ")}`);
}

/** No value leaks out as JavaScript's placeholders. */
async function assertNoJunk(page, where) {
  const text = await page.locator("main").innerText();
  for (const junk of ["null", "undefined", "NaN", "[object"]) {
    if (text.includes(junk)) throw new Error(`${where} shows "${junk}": ${text}`);
  }
}

async function statusOf(page, user) {
  return (await page.locator(`tr[data-user="${user}"] .status`).textContent()).trim();
}

async function waitStatus(page, user, want, seconds) {
  const deadline = Date.now() + seconds * 1000;
  let now = "";
  while (Date.now() < deadline) {
    now = await statusOf(page, user).catch(() => "");
    if (now === want) return;
    await page.waitForTimeout(250);
  }
  await shot(page, `timeout-${user}-${want}`);
  throw new Error(`${user}: ${want} not within ${seconds} s (still ${now})`);
}

(async () => {
  const browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync"],
  });
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const problems = [];
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("console", (m) => { if (m.type() === "error") problems.push(`console: ${m.text()}`); });
  page.setDefaultTimeout(20000);

  // Sign in (a wrong token first).
  await page.goto(env("BASE_URL"));
  await page.getByRole("heading", { name: "Sign in" }).waitFor();
  // The first Tab stop of the page is the skip link, which shows itself when focused.
  const first = await page.evaluate(() => [...document.querySelectorAll("a[href], button, input, select, textarea")]
    .find((el) => !el.closest("[hidden]") && !el.hidden).textContent);
  if (first !== "Skip to content") throw new Error(`the first Tab stop is ${first}, not the skip link`);
  await page.locator("a.skip").focus();
  const box = await page.locator("a.skip").boundingBox();
  if (!box || box.x < 0) throw new Error("the focused skip link is off screen");
  await page.getByLabel("API token").fill("not-a-token-at-all");
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByRole("alert").getByText("This token was not accepted").waitFor();
  // The wrong token's 401 is the one error the browser may report.
  problems.length = 0;
  // With the keyboard only: the token field, typing, Enter.
  await page.getByLabel("API token").focus();
  await page.keyboard.press("Control+A");
  await page.keyboard.press("Backspace");
  await page.keyboard.type(env("TOKEN"));
  await page.keyboard.press("Enter");
  await page.getByRole("heading", { name: "Migrations" }).waitFor();
  const focused = await page.evaluate(() => document.activeElement.tagName);
  if (focused !== "H1") throw new Error(`after navigating, the focus is on ${focused}, not the page's heading`);
  await shot(page, "01-migrations");

  // New migration: the source provider, with each preset's note.
  await page.getByRole("link", { name: "New migration" }).first().click();
  await page.getByRole("heading", { name: "1. Source provider" }).waitFor();
  for (const note of ["app password", "Yahoo needs"]) {
    if (!(await page.getByText(note).first().isVisible())) throw new Error(`the note "${note}" is not shown`);
  }
  // Each provider offers its own ways to log in, each with the fields it needs.
  const source = page.locator("section[aria-labelledby=source-h]");
  await page.getByLabel("Microsoft 365").check();
  await source.getByLabel("Login method").selectOption("client_secret");
  for (const label of ["Tenant (directory id or domain)", "Application (client) id", "Client secret"]) {
    if (!(await source.getByLabel(label, { exact: true }).isVisible())) throw new Error(`Microsoft 365's app login lacks "${label}"`);
  }
  if (await source.getByLabel("Password or app password").isVisible()) throw new Error("an app-only login asks for the user's password");
  await assertLabelled(page, "the Microsoft 365 app form");
  await shot(page, "02a-source-microsoft365");
  await page.getByLabel("Outlook.com").check();
  if (!(await source.getByLabel("Refresh token", { exact: true }).isVisible())) throw new Error("Outlook.com's test account takes no refresh token");
  await page.getByLabel("Google Workspace").check();
  if (!(await source.getByLabel("Service account key (JSON)").isVisible())) throw new Error("Google Workspace asks for no service account key");
  await page.getByLabel("Other IMAP server").check();
  if (await source.getByLabel("Login method").isVisible()) throw new Error("a password-only provider shows a choice of login methods");
  await source.getByLabel("Server name", { exact: true }).fill("127.0.0.1");
  await source.getByLabel("Security", { exact: true }).selectOption("plain");
  await source.getByLabel("Port", { exact: true }).fill(env("SOURCE_PORT"));
  await source.getByLabel("Login", { exact: true }).fill("alice@example.com");
  await source.getByLabel("Password or app password").fill("wrong-password");
  await assertLabelled(page, "source form");
  await shot(page, "02-source");
  await source.getByRole("button", { name: "Save and test the connection" }).click();
  await source.getByText("Connection failed (authentication rejected)").waitFor();
  await assertContrast(page, "the source form with its verdict");
  await shot(page, "03-source-rejected");
  await source.getByLabel("Password or app password").fill(env("ALICE_PASSWORD"));
  await source.getByRole("button", { name: "Save and test the connection" }).click();
  await source.getByText("Connection works.").waitFor();

  // The target, logging in as a Dovecot master user.
  const target = page.locator("section[aria-labelledby=target-h]");
  await target.getByRole("heading", { name: "2. Target server" }).waitFor();
  await target.getByLabel("Server name", { exact: true }).fill("127.0.0.1");
  await target.getByLabel("Security", { exact: true }).selectOption("plain");
  await target.getByLabel("Port", { exact: true }).fill(env("TARGET_PORT"));
  await target.getByLabel("Login method").selectOption("dovecot_master");
  await target.getByLabel("Admin or master user").fill(env("MASTER_USER"));
  await target.getByLabel("Its password").fill(env("MASTER_PASSWORD"));
  await target.getByLabel("Login", { exact: true }).fill("bob@example.com");
  await assertLabelled(page, "target form");
  await target.getByRole("button", { name: "Save and test the connection" }).click();
  await target.getByText("Connection works.").waitFor();
  await shot(page, "04-target-ok");

  await page.getByLabel("Name of this migration").fill("Sales team");
  await page.getByRole("button", { name: "Create the migration" }).click();
  await page.getByRole("heading", { name: "Sales team" }).waitFor();

  // Users: alice from a CSV (with her password), bob typed in (password at start).
  await page.getByLabel("Or a CSV file").setInputFiles({
    name: "users.csv", mimeType: "text/csv",
    buffer: Buffer.from(`EmailAddress,UserName,Password\r\nalice@example.com,alice@example.com,${env("ALICE_PASSWORD")}\r\nnot-an-address,x,y\r\n`),
  });
  await page.getByLabel("Addresses, one per line").fill("bob@example.com");
  await page.getByRole("button", { name: "Add users" }).click();
  await page.getByText("Line 3: EmailAddress \"not-an-address\" is not an email address").waitFor();
  await page.locator('tr[data-user="bob@example.com"]').waitFor();
  await assertLabelled(page, "batch page");
  await shot(page, "05-users");

  // Folder rules: a malformed rename is refused with its reason, a good rule is saved
  // (one that matches no folder of the test's, so the mail compared later is all there).
  const rename = page.getByLabel("Rename (FROM=TO, or Archive/*=Old/* for a subtree)");
  await rename.fill("Archive");
  await page.getByRole("button", { name: "Save folder rules" }).click();
  await page.getByText("must look like FROM=TO").waitFor();
  // That refusal (422) is the one error the browser may report here.
  const refused = problems.filter((p) => !p.includes("422"));
  problems.length = 0;
  problems.push(...refused);
  await rename.fill("");
  await page.getByLabel("Do not copy these folders").fill("Nothing here/*");
  await page.getByRole("button", { name: "Save folder rules" }).click();
  await page.getByText("Folder rules saved").waitFor();

  // The preview before Start: alice's mail counted at both servers, bob's missing
  // password named on his row, and nothing changed at either server.
  await page.getByRole("button", { name: "Preview", exact: true }).click();
  const preview = page.getByRole("table", { name: "Preview" });
  await preview.getByRole("cell", { name: "alice@example.com" }).waitFor();
  const bobRow = preview.getByRole("row").filter({ hasText: "bob@example.com" });
  await bobRow.getByText("password").waitFor();
  await assertContrast(page, "the preview");
  await shot(page, "05b-preview");

  // Start both: bob's password typed in his row.
  await page.getByLabel("Select every user").check();
  await page.getByLabel("Source password for bob@example.com").fill(env("BOB_PASSWORD"));
  await page.getByRole("button", { name: "Start migration" }).click();
  await page.getByText("Start migration: 2 user(s).").waitFor();
  await waitStatus(page, "alice@example.com", "Synced", 120);
  await waitStatus(page, "bob@example.com", "Synced", 120);
  await assertNoJunk(page, "the batch page");
  await assertContrast(page, "the batch page");
  await shot(page, "06-synced");

  // alice's detail: her folders, each done and verified.
  await page.getByRole("link", { name: "alice@example.com" }).click();
  await page.getByRole("heading", { name: "alice@example.com" }).waitFor();
  await page.getByRole("heading", { name: "Folders" }).waitFor();
  const rows = await page.locator("table tbody tr").count();
  if (rows < 3) throw new Error(`alice's detail shows ${rows} folders`);
  await assertNoJunk(page, "alice's detail");
  await assertContrast(page, "alice's detail");
  await shot(page, "07-detail");
  await page.getByRole("link", { name: "Back to the migration" }).click();
  await page.getByRole("heading", { name: "Sales team" }).waitFor();

  // Stop bob; close alice (the console asks first).
  await page.locator('tr[data-user="bob@example.com"] input[name=selected]').check();
  await page.getByRole("button", { name: "Stop migration" }).click();
  await waitStatus(page, "bob@example.com", "Stopped", 30);
  await page.locator('tr[data-user="bob@example.com"] input[name=selected]').uncheck();
  await page.locator('tr[data-user="alice@example.com"] input[name=selected]').check();
  if (!(await page.getByText("point MX at the new server").isVisible())) throw new Error("Close says nothing of the cutover");
  page.once("dialog", (d) => d.accept());
  await page.getByRole("button", { name: "Close connection" }).click();
  await waitStatus(page, "alice@example.com", "Completed", 120);
  await shot(page, "08-closed");
  // A closed user's page still tells what happened (its logins are gone with its secrets).
  await page.getByRole("link", { name: "alice@example.com" }).click();
  await page.getByRole("heading", { name: "alice@example.com" }).waitFor();
  await page.locator("main .status.completed").first().waitFor();
  await assertNoJunk(page, "alice's detail after Close");
  await page.getByRole("link", { name: "Back to the migration" }).click();
  await page.getByRole("heading", { name: "Sales team" }).waitFor();

  // A narrow window: nothing wider than the screen.
  await page.setViewportSize({ width: 360, height: 740 });
  await page.waitForTimeout(300);
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  if (overflow > 1) throw new Error(`the page is ${overflow}px wider than a 360px window`);
  await shot(page, "09-narrow");

  if (problems.length) throw new Error(problems.join("\n"));
  await browser.close();
  console.log("console e2e: ok");
})().catch((e) => {
  console.error(e.stack || String(e));
  process.exit(1);
});
