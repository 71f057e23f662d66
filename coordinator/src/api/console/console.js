// The mailferry console: a client of /api/v1 like any other. Plain JavaScript, no
// build step. Pages (by the URL's #fragment): sign in, migrations, a new migration
// (source provider, target server, batch), a batch (users, live statuses, actions) and
// a user's detail. Every element is made with h() from text, never from HTML strings.
"use strict";

const TOKEN_KEY = "mailferry.token";
// The providers come from /presets (the server's one list); this is the last choice.
const CUSTOM = { name: "custom", label: "Other IMAP server", logins: ["password"] };
// How each way of logging in is offered, and what the test account's secret is then.
const LOGINS = {
  password: { label: "Each user's password or app password", secret: "Password or app password" },
  refresh_token: { label: "OAuth2: each user's refresh token", secret: "Refresh token", clientId: true, clientSecret: "optional" },
  client_secret: { label: "OAuth2 app for the organisation (client secret)", clientId: true, clientSecret: "required", tenant: true },
  service_account: { label: "Google service account with domain-wide delegation", keyFile: true },
};
const STATUS_LABEL = {
  notstarted: "Not started", starting: "Starting", queued: "Queued", syncing: "Syncing",
  synced: "Synced", failed: "Failed", stopped: "Stopped", completed: "Completed",
};

let stream = null; // the batch page's live event stream (an AbortController)
let uid = 0;

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === false || v === null || v === undefined) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function field(label, input, hint) {
  const id = input.id || `f${++uid}`;
  input.id = id;
  const hintEl = hint ? h("p", { class: "hint", id: `${id}-hint` }, hint) : null;
  if (hintEl) input.setAttribute("aria-describedby", hintEl.id);
  return h("div", {}, h("label", { for: id }, label), input, hintEl);
}

function announce(text) {
  const region = document.getElementById("announce");
  region.textContent = "";
  setTimeout(() => { region.textContent = text; }, 50);
}

function token() { return sessionStorage.getItem(TOKEN_KEY); }

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function api(method, path, body, contentType) {
  const headers = { Authorization: `Bearer ${token()}` };
  let payload;
  if (body !== undefined) {
    headers["Content-Type"] = contentType || "application/json";
    payload = contentType ? body : JSON.stringify(body);
  }
  const res = await fetch(`/api/v1${path}`, { method, headers, body: payload });
  if (res.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    // On the sign-in page itself the form shows the error; elsewhere, back to it.
    if (location.hash !== "#/signin") go("#/signin");
    throw new ApiError(401, "unauthorized", "This token was not accepted: check it and sign in again.");
  }
  if (res.status === 204) return null;
  const data = await res.json().catch(() => null);
  if (!res.ok) {
    const e = (data && data.error) || {};
    throw new ApiError(res.status, e.code || "http", e.message || `The server answered ${res.status}.`);
  }
  return data;
}

function go(hash) {
  if (location.hash === hash) route(); else location.hash = hash;
}

function show(title, ...content) {
  if (stream) { stream.abort(); stream = null; }
  const main = document.getElementById("main");
  main.replaceChildren(h("h1", { tabindex: "-1" }, title), ...content.filter(Boolean));
  document.title = `${title} · mailferry`;
  main.querySelector("h1").focus();
}

function errorBox(e) {
  return h("p", { class: "error", role: "alert" }, e.message);
}

function busy(button, text) {
  const old = button.textContent;
  button.disabled = true;
  button.textContent = text;
  return () => { button.disabled = false; button.textContent = old; };
}

// ---- sign in ----

function signIn() {
  const input = h("input", { type: "password", autocomplete: "current-password", required: true });
  const out = h("div", {});
  const form = h("form", {
    onsubmit: async (ev) => {
      ev.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, input.value.trim());
      try {
        await api("GET", "/batches");
        go("#/");
      } catch (e) { out.replaceChildren(errorBox(e)); }
    },
  }, field("API token", input, "Your installation's administrator gives you a token for your organisation."),
    h("div", { class: "actions" }, h("button", { type: "submit" }, "Sign in")), out);
  show("Sign in", form);
}

// ---- migrations ----

async function home() {
  const batches = await api("GET", "/batches");
  const list = batches.length
    ? h("ul", {}, batches.map((b) => h("li", {}, h("a", { href: `#/batch/${encodeURIComponent(b.id)}` }, b.name))))
    : h("p", {}, "No migration yet.");
  show("Migrations", list, h("p", {}, h("a", { class: "button", href: "#/new" }, "New migration")));
}

// ---- a new migration: source, target, batch ----

function verdictBox(verdict) {
  if (verdict.ok) {
    return h("div", { class: "verdict ok", role: "status" },
      h("strong", {}, "Connection works. "), "The server logged the test account in.",
      h("p", { class: "hint" }, `Capabilities: ${verdict.capabilities.join(" ")}`));
  }
  return h("div", { class: "verdict bad", role: "alert" },
    h("strong", {}, `Connection failed (${verdict.failure.code.replace(/_/g, " ")}). `), verdict.failure.message);
}

/**
 * Saves an endpoint and tests it with one account: resolves to the endpoint if the test
 * passed; otherwise the endpoint is removed again and the verdict says why.
 */
async function saveAndTest(body, login, password, out) {
  const endpoint = await api("POST", "/endpoints", body);
  const path = `/endpoints/${encodeURIComponent(endpoint.id)}`;
  let verdict;
  try {
    verdict = await api("POST", `${path}/test`, { login, password: password || null });
  } finally {
    if (!verdict || !verdict.ok) await api("DELETE", path).catch(() => {});
  }
  out.replaceChildren(verdictBox(verdict));
  announce(verdict.ok ? "Connection works." : `Connection failed: ${verdict.failure.message}`);
  return verdict.ok ? endpoint : null;
}

function serverFields(prefix, defaults) {
  const host = h("input", { type: "text", name: `${prefix}-host`, autocomplete: "off", value: defaults.host || "" });
  const port = h("input", { type: "number", name: `${prefix}-port`, min: "1", max: "65535", value: defaults.port || "993" });
  const security = h("select", { name: `${prefix}-security` },
    h("option", { value: "tls" }, "TLS (port 993)"),
    h("option", { value: "starttls" }, "STARTTLS (port 143)"),
    h("option", { value: "plain" }, "None (plaintext; a trusted network only)"));
  security.addEventListener("change", () => {
    port.value = security.value === "tls" ? "993" : "143";
  });
  return { host, port, security };
}

async function newMigration() {
  const presets = await api("GET", "/presets");
  const PROVIDERS = [...presets, CUSTOM];
  const notes = Object.fromEntries(presets.map((p) => [p.name, p.note]));
  const state = { source: null, target: null };
  const sourceSection = h("section", { "aria-labelledby": "source-h" });
  const targetSection = h("section", { "aria-labelledby": "target-h", hidden: true });
  const batchSection = h("section", { "aria-labelledby": "batch-h", hidden: true });

  // 1. Source
  // Each provider's note is the radio button's description, read after its name.
  const radios = PROVIDERS.map((p) => h("div", { class: "choice" },
    h("input", {
      type: "radio", name: "provider", id: `provider-${p.name}`, value: p.name, checked: p.name === "gmail",
      "aria-describedby": notes[p.name] ? `note-${p.name}` : null,
    }),
    h("div", {}, h("label", { for: `provider-${p.name}` }, p.label),
      notes[p.name] ? h("p", { class: "hint", id: `note-${p.name}` }, notes[p.name]) : null)));
  const custom = serverFields("source", {});
  const customBox = h("div", { hidden: true }, field("Server name", custom.host), field("Port", custom.port), field("Security", custom.security));
  const sourceLogin = h("input", { type: "text", name: "source-login", autocomplete: "off" });
  const sourcePassword = h("input", { type: "password", name: "source-password", autocomplete: "off" });
  // How mailferry logs in: the chosen provider's ways, each with the fields it needs.
  const method = h("select", { name: "source-method" });
  const tenant = h("input", { type: "text", name: "source-tenant", autocomplete: "off" });
  const clientId = h("input", { type: "text", name: "source-client-id", autocomplete: "off" });
  const clientSecret = h("input", { type: "password", name: "source-client-secret", autocomplete: "off" });
  const keyFile = h("textarea", { name: "source-key", rows: "4", autocomplete: "off", spellcheck: "false" });
  const tenantField = field("Tenant (directory id or domain)", tenant, "Your organisation's Microsoft Entra tenant.");
  const clientIdField = field("Application (client) id", clientId);
  const clientSecretField = field("Client secret", clientSecret);
  const keyField = field("Service account key (JSON)", keyFile, "The key file Google gave for the service account, pasted whole.");
  const passwordField = field("Password or app password", sourcePassword);
  const secretLabel = passwordField.querySelector("label");
  const methodBox = h("fieldset", {}, h("legend", {}, "How mailferry logs in"),
    field("Login method", method), tenantField, clientIdField, clientSecretField, keyField);
  const chosen = () => PROVIDERS.find((p) => p.name === sourceForm.querySelector("input[name=provider]:checked").value);
  const showMethod = () => {
    const login = LOGINS[method.value] || LOGINS.password;
    const microsoft = chosen().oauth && chosen().oauth.token_url.includes("{tenant}");
    tenantField.hidden = !(login.tenant && microsoft);
    clientIdField.hidden = !login.clientId;
    clientSecretField.hidden = !login.clientSecret;
    clientSecretField.querySelector("label").textContent = login.clientSecret === "optional" ? "Client secret (if the app has one)" : "Client secret";
    keyField.hidden = !login.keyFile;
    passwordField.hidden = !login.secret;
    if (login.secret) secretLabel.textContent = login.secret;
  };
  const showProvider = () => {
    const provider = chosen();
    const offered = provider.logins.filter((l) => LOGINS[l]);
    method.replaceChildren(...offered.map((l) => h("option", { value: l }, LOGINS[l].label)));
    methodBox.hidden = offered.length < 2 && offered[0] === "password";
    customBox.hidden = provider.name !== "custom";
    showMethod();
  };
  method.addEventListener("change", showMethod);
  const sourceOut = h("div", {});
  const sourceForm = h("form", {
    onsubmit: async (ev) => {
      ev.preventDefault();
      const { name: provider, label } = chosen();
      const body = { name: provider === "custom" ? custom.host.value.trim() || "Source" : label, role: "source", provider };
      if (provider === "custom") {
        Object.assign(body, { host: custom.host.value.trim(), port: Number(custom.port.value), security: custom.security.value });
      }
      const login = method.value || "password";
      if (login !== "password") {
        body.auth = { method: "oauth2", client_id: clientId.value.trim(), grant: { kind: login } };
        if (!tenantField.hidden && tenant.value.trim()) body.tenant = tenant.value.trim();
        const app = login === "service_account" ? keyFile.value.trim() : clientSecret.value;
        if (app) body.app_secret = app;
      }
      const done = busy(ev.submitter, "Testing the connection…");
      try {
        state.source = await saveAndTest(body, sourceLogin.value.trim(), sourcePassword.value, sourceOut);
        if (state.source) { targetSection.hidden = false; targetSection.querySelector("h2").focus(); }
      } catch (e) { sourceOut.replaceChildren(errorBox(e)); } finally { done(); }
    },
  },
  h("fieldset", {}, h("legend", {}, "Where is the mail now?"), radios, customBox),
  methodBox,
  h("fieldset", {}, h("legend", {}, "Test account"),
    h("p", { class: "hint" }, "One mailbox to check the settings with: mailferry logs in and out, and copies nothing. With OAuth2 the test fetches a token first, so a wrong client id or secret is named here."),
    field("Login", sourceLogin), passwordField),
  h("div", { class: "actions" }, h("button", { type: "submit" }, "Save and test the connection")), sourceOut);
  sourceForm.addEventListener("change", (ev) => {
    if (ev.target.name === "provider") showProvider();
  });
  showProvider();
  sourceSection.append(h("h2", { id: "source-h", tabindex: "-1" }, "1. Source provider"), sourceForm);

  // 2. Target
  const target = serverFields("target", {});
  const auth = h("select", { name: "target-auth" },
    h("option", { value: "password" }, "Each user's own password"),
    h("option", { value: "dovecot_master" }, "A Dovecot master user"),
    h("option", { value: "admin_plain" }, "An admin login acting for each user (SASL PLAIN)"));
  const adminName = h("input", { type: "text", name: "target-admin", autocomplete: "off" });
  const adminPassword = h("input", { type: "password", name: "target-admin-password", autocomplete: "off" });
  const adminBox = h("div", { hidden: true }, field("Admin or master user", adminName), field("Its password", adminPassword));
  auth.addEventListener("change", () => { adminBox.hidden = auth.value === "password"; });
  const targetLogin = h("input", { type: "text", name: "target-login", autocomplete: "off" });
  const targetPassword = h("input", { type: "password", name: "target-password", autocomplete: "off" });
  const targetPasswordField = field("Password", targetPassword, "Not needed with an admin or master user.");
  const targetOut = h("div", {});
  const targetForm = h("form", {
    onsubmit: async (ev) => {
      ev.preventDefault();
      const body = {
        name: target.host.value.trim() || "Target", role: "target", provider: "custom",
        host: target.host.value.trim(), port: Number(target.port.value), security: target.security.value,
      };
      if (auth.value === "dovecot_master") { body.auth = { method: "dovecot_master", master: adminName.value.trim() }; body.admin_password = adminPassword.value; }
      if (auth.value === "admin_plain") { body.auth = { method: "admin_plain", admin: adminName.value.trim() }; body.admin_password = adminPassword.value; }
      const done = busy(ev.submitter, "Testing the connection…");
      try {
        state.target = await saveAndTest(body, targetLogin.value.trim(), targetPassword.value, targetOut);
        if (state.target) { batchSection.hidden = false; batchSection.querySelector("h2").focus(); }
      } catch (e) { targetOut.replaceChildren(errorBox(e)); } finally { done(); }
    },
  },
  h("fieldset", {}, h("legend", {}, "Where should the mail go?"), field("Server name", target.host), field("Port", target.port), field("Security", target.security)),
  h("fieldset", {}, h("legend", {}, "How mailferry logs in"), field("Login method", auth), adminBox),
  h("fieldset", {}, h("legend", {}, "Test account"), field("Login", targetLogin), targetPasswordField),
  h("div", { class: "actions" }, h("button", { type: "submit" }, "Save and test the connection")), targetOut);
  targetSection.append(h("h2", { id: "target-h", tabindex: "-1" }, "2. Target server"), targetForm);

  // 3. Batch
  const batchName = h("input", { type: "text", name: "batch-name", autocomplete: "off", required: true });
  const batchOut = h("div", {});
  const batchForm = h("form", {
    onsubmit: async (ev) => {
      ev.preventDefault();
      try {
        const batch = await api("POST", "/batches", { name: batchName.value.trim(), source_endpoint: state.source.id, target_endpoint: state.target.id });
        go(`#/batch/${encodeURIComponent(batch.id)}`);
      } catch (e) { batchOut.replaceChildren(errorBox(e)); }
    },
  }, field("Name of this migration", batchName, "For example: Sales team, March."),
  h("div", { class: "actions" }, h("button", { type: "submit" }, "Create the migration")), batchOut);
  batchSection.append(h("h2", { id: "batch-h", tabindex: "-1" }, "3. Name the migration"), batchForm);

  show("New migration", sourceSection, targetSection, batchSection);
}

// ---- a batch ----

function statusCell(user) {
  return h("span", { class: `status ${user.status}` }, STATUS_LABEL[user.status] || user.status);
}

function progressCell(user) {
  const label = `${user.jobs_done} of ${user.jobs} folders`;
  return h("div", {}, h("progress", { max: String(Math.max(user.jobs, 1)), value: String(user.jobs_done), "aria-label": `${user.id}: ${label}` }),
    h("div", { class: "hint" }, user.jobs ? label : ""));
}

function userRow(batchId, user, selected) {
  const box = h("input", { type: "checkbox", name: "selected", value: user.id, "aria-label": `Select ${user.id}`, checked: selected.has(user.id) });
  box.addEventListener("change", () => { if (box.checked) selected.add(user.id); else selected.delete(user.id); });
  const password = h("input", { type: "password", class: "row-password", name: "password", autocomplete: "off", "aria-label": `Source password for ${user.id}` });
  return h("tr", { "data-user": user.id },
    h("td", {}, box),
    h("td", {}, h("a", { href: `#/batch/${encodeURIComponent(batchId)}/user/${encodeURIComponent(user.id)}` }, user.id)),
    h("td", {}, statusCell(user), user.reason ? h("div", { class: "hint" }, user.reason) : null),
    h("td", {}, progressCell(user)),
    h("td", { class: "num" }, String(user.copied)),
    h("td", { class: "num" }, String(user.skipped)),
    h("td", {}, password));
}

function summaryList(summary) {
  const items = [h("li", {}, `${summary.users} users`)];
  for (const [status, n] of Object.entries(summary.users_by_status)) items.push(h("li", {}, `${n} ${STATUS_LABEL[status] || status}`));
  items.push(h("li", {}, `${summary.copied} messages copied`), h("li", {}, `${summary.skipped} skipped`));
  return h("ul", { class: "summary", "aria-label": "Totals" }, items);
}

async function batchPage(batchId) {
  const path = `/batches/${encodeURIComponent(batchId)}`;
  const [batch, page] = await Promise.all([api("GET", path), api("GET", `${path}/users?limit=10000`)]);
  const selected = new Set();
  const summaryBox = h("div", {}, summaryList(batch.summary));
  const tbody = h("tbody", {});
  const rows = new Map();
  const put = (user) => {
    const row = userRow(batchId, user, selected);
    const old = rows.get(user.id);
    if (old) {
      // keep what the admin typed and where the focus is
      const typed = old.querySelector("input[name=password]");
      const fresh = row.querySelector("input[name=password]");
      if (document.activeElement === typed) { rows.set(user.id, old); updateRow(old, user); return; }
      fresh.value = typed.value;
      old.replaceWith(row);
    } else tbody.append(row);
    rows.set(user.id, row);
  };
  const updateRow = (row, user) => {
    const cells = row.children;
    cells[2].replaceChildren(statusCell(user), user.reason ? h("div", { class: "hint" }, user.reason) : "");
    cells[3].replaceChildren(progressCell(user));
    cells[4].textContent = String(user.copied);
    cells[5].textContent = String(user.skipped);
  };
  page.users.forEach(put);
  const allBox = h("input", { type: "checkbox", "aria-label": "Select every user" });
  allBox.addEventListener("change", () => {
    for (const [id, row] of rows) {
      row.querySelector("input[name=selected]").checked = allBox.checked;
      if (allBox.checked) selected.add(id); else selected.delete(id);
    }
  });
  const table = h("div", { class: "table-wrap" }, h("table", {},
    h("caption", { class: "visually-hidden" }, "Users of this migration"),
    h("thead", {}, h("tr", {}, h("th", {}, allBox), h("th", { scope: "col" }, "User"), h("th", { scope: "col" }, "Status"),
      h("th", { scope: "col" }, "Progress"), h("th", { scope: "col", class: "num" }, "Copied"), h("th", { scope: "col", class: "num" }, "Skipped"),
      h("th", { scope: "col" }, "Source password"))),
    tbody));
  const out = h("div", {});
  const chosen = () => [...selected];
  const act = (verb, label) => async (ev) => {
    const users = chosen();
    if (!users.length) { out.replaceChildren(errorBox(new Error("Tick the users first."))); return; }
    if (verb === "close" && !confirm(`Close ${users.length} user(s)? A final sync runs, then their stored passwords are deleted. Close after the cutover: once the MX records point at the new server, so that the final sync picks up the last mail delivered to the old one.`)) return;
    const body = { users };
    if (verb === "start") {
      body.source_passwords = {};
      for (const id of users) {
        const typed = rows.get(id).querySelector("input[name=password]").value;
        if (typed) body.source_passwords[id] = typed;
      }
    }
    const done = busy(ev.currentTarget, `${label}…`);
    try {
      const report = await api("POST", `${path}/${verb}`, body);
      for (const id of report.applied) { const p = rows.get(id)?.querySelector("input[name=password]"); if (p) p.value = ""; }
      const lines = [h("p", {}, `${label}: ${report.applied.length} user(s).`)];
      for (const r of report.refused) lines.push(h("p", { class: "error" }, `${r.user}: ${r.reason}`));
      out.replaceChildren(h("div", { class: `verdict ${report.refused.length ? "bad" : "ok"}`, role: "status" }, lines));
      announce(`${label}: ${report.applied.length} user(s)${report.refused.length ? `, ${report.refused.length} refused` : ""}.`);
    } catch (e) { out.replaceChildren(errorBox(e)); } finally { done(); }
  };
  const actions = h("div", { class: "actions" },
    h("button", { type: "button", onclick: act("start", "Start migration") }, "Start migration"),
    h("button", { type: "button", class: "secondary", onclick: act("sync-now", "Sync now") }, "Sync now"),
    h("button", { type: "button", class: "secondary", onclick: act("stop", "Stop migration") }, "Stop migration"),
    h("button", { type: "button", class: "danger", onclick: act("close", "Close connection"), "aria-describedby": "cutover-hint" }, "Close connection"),
    h("p", { class: "hint", id: "cutover-hint" },
      "Cutting over: lower the MX records' TTL a day ahead, point MX at the new server, let the scheduled syncs pick up what still arrives at the old one, then Close: a final sync runs and the passwords are deleted."));

  // Adding users: addresses typed in, or a CSV file.
  const typed = h("textarea", { name: "addresses", rows: "4" });
  const file = h("input", { type: "file", name: "csv", accept: ".csv,text/csv" });
  const addOut = h("div", {});
  const addForm = h("form", {
    onsubmit: async (ev) => {
      ev.preventDefault();
      const done = busy(ev.submitter, "Adding…");
      try {
        const messages = [];
        if (file.files.length) {
          const text = await file.files[0].text();
          const r = await api("POST", `${path}/users/import`, text, "text/csv");
          messages.push(h("p", {}, `CSV: ${r.added} added, ${r.updated} updated, ${r.errors.length} refused.`));
          for (const e of r.errors) messages.push(h("p", { class: "error" }, `Line ${e.line}: ${e.reason}`));
        }
        for (const line of typed.value.split(/[\n,;]+/).map((s) => s.trim()).filter(Boolean)) {
          try {
            const u = await api("POST", `${path}/users`, { email: line });
            messages.push(h("p", {}, `${u.id} added.`));
          } catch (e) { messages.push(h("p", { class: "error" }, `${line}: ${e.message}`)); }
        }
        addOut.replaceChildren(h("div", { class: "verdict", role: "status" }, messages));
        typed.value = ""; file.value = "";
        const fresh = await api("GET", `${path}/users?limit=10000`);
        fresh.users.forEach(put);
      } catch (e) { addOut.replaceChildren(errorBox(e)); } finally { done(); }
    },
  }, field("Addresses, one per line", typed, "The login at both servers is the address; type each user's password in the list before starting."),
  field("Or a CSV file", file, "EmailAddress,UserName,Password (and optionally TargetUserName,TargetPassword), as for Exchange migrations."),
  h("div", { class: "actions" }, h("button", { type: "submit", class: "secondary" }, "Add users")), addOut);

  // Which folders the users copy and where they land, for the passes planned from now on.
  const rules = batch.folder_rules || { include: [], exclude: [], rename: [] };
  const lines = (list) => h("textarea", { rows: "3", spellcheck: "false" }, list.join("\n"));
  const include = lines(rules.include);
  const exclude = lines(rules.exclude);
  const rename = lines(rules.rename);
  const archive = h("input", { type: "text", name: "archive", spellcheck: "false", placeholder: "Archive", value: rules.archive || "" });
  include.name = "include"; exclude.name = "exclude"; rename.name = "rename";
  const rulesOut = h("div", {});
  const split = (box) => box.value.split("\n").map((l) => l.trim()).filter(Boolean);
  const rulesForm = h("form", {
    onsubmit: async (ev) => {
      ev.preventDefault();
      const done = busy(ev.submitter, "Saving…");
      try {
        const folderRules = { include: split(include), exclude: split(exclude), rename: split(rename) };
        if (archive.value.trim()) folderRules.archive = archive.value.trim();
        await api("PATCH", path, { folder_rules: folderRules });
        rulesOut.replaceChildren(h("p", { class: "verdict", role: "status" }, "Folder rules saved: they apply to the next sync of each user."));
      } catch (e) { rulesOut.replaceChildren(errorBox(e)); } finally { done(); }
    },
  }, h("p", { class: "hint" }, "One pattern per line; * matches anything, / separates levels."),
  field("Copy only these folders (empty: all)", include),
  field("Do not copy these folders", exclude),
  field("Rename (FROM=TO, or Archive/*=Old/* for a subtree)", rename),
  field("Archived mail goes to", archive, "Gmail's mail that is only in All Mail (archived, no label) lands in this folder, once; labelled mail goes to its labels' folders only. Empty: the target's archive folder, else Archive (All Mail if a label is called Archive). Exclude [Gmail]/All Mail to leave it behind."),
  h("div", { class: "actions" }, h("button", { type: "submit", class: "secondary" }, "Save folder rules")), rulesOut);

  // Before Start: what each user's first pass would copy, and who would not fit.
  const previewOut = h("div", {});
  const previewForm = h("form", {
    onsubmit: async (ev) => {
      ev.preventDefault();
      const done = busy(ev.submitter, "Looking at the servers…");
      try {
        previewOut.replaceChildren(previewTable(await api("POST", `${path}/preview`, {})));
      } catch (e) { previewOut.replaceChildren(errorBox(e)); } finally { done(); }
    },
  }, h("p", { class: "hint" }, "Logs in to both servers for the first 20 users and changes nothing: each user's folders with their messages and sizes, and the target's quota where the server has one."),
  h("div", { class: "actions" }, h("button", { type: "submit", class: "secondary" }, "Preview")), previewOut);

  const reports = h("p", {}, "Report: ",
    h("button", { type: "button", class: "link", onclick: () => download(`${path}/report.csv`, `mailferry-${batchId}.csv`) }, "CSV"), " · ",
    h("button", { type: "button", class: "link", onclick: () => download(`${path}/report.json`, `mailferry-${batchId}.json`) }, "JSON"));
  const live = h("p", { class: "hint", id: "live" }, "Connecting to live updates…");
  show(batch.name, summaryBox, live, h("h2", {}, "Users"), actions, out, table,
    h("h2", {}, "Add users"), addForm, h("h2", {}, "Folders"), rulesForm,
    h("h2", {}, "Preview"), previewForm, reports,
    h("p", { class: "hint" }, `Synced users are synced again every ${Math.round(batch.sync_interval_secs / 3600 * 10) / 10} h.`));
  follow(`${path}/events`, (event, data) => {
    if (event === "user") put(JSON.parse(data));
    else if (event === "summary") summaryBox.replaceChildren(summaryList(JSON.parse(data)));
  }, live);
}

function humanBytes(n) {
  if (n === null || n === undefined) return "?";
  const units = ["bytes", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return i === 0 ? `${n} bytes` : `${n.toFixed(1)} ${units[i]}`;
}

// One row per user; its folder mapping folds out.
function previewTable(preview) {
  const fit = (u) => {
    if (u.problem) return h("span", { class: "error" }, u.problem);
    if (!u.quota) return "no quota announced";
    const room = `${humanBytes(u.quota.used_bytes)} of ${humanBytes(u.quota.limit_bytes)} used`;
    if (u.fits === false) return h("strong", { class: "error" }, `Would not fit (${room})`);
    return u.fits ? `Fits (${room})` : room;
  };
  const mapping = (u) => h("details", {}, h("summary", {}, `${u.folders.length} folders`),
    h("ul", {}, u.folders.map((f) => h("li", {},
      `${f.source_path} → ${f.target_path}: `,
      f.action === "exclude" ? `not copied (${f.reason})`
        : f.action === "create" ? "created (a container)"
        : `${f.messages ?? "?"} messages, ${humanBytes(f.size)}${f.archive_only ? ", only those in no other folder" : ""}`,
      f.problem ? h("span", { class: "error" }, ` ${f.problem}`) : null))));
  return h("div", { class: "table-wrap" }, h("table", {},
    h("caption", { class: "visually-hidden" }, "Preview"),
    h("thead", {}, h("tr", {}, ["User", "Messages", "Size", "Target quota", "Folders"]
      .map((t) => h("th", { scope: "col", class: ["Messages", "Size"].includes(t) ? "num" : null }, t)))),
    h("tbody", {}, preview.users.map((u) => h("tr", {},
      h("td", {}, u.user), h("td", { class: "num" }, String(u.messages)),
      h("td", { class: "num" }, humanBytes(u.bytes)), h("td", {}, fit(u)),
      h("td", {}, u.problem ? "" : mapping(u)))))),
    preview.more ? h("p", { class: "hint" }, `${preview.more} more users are not shown.`) : null);
}

async function download(path, name) {
  const res = await fetch(`/api/v1${path}`, { headers: { Authorization: `Bearer ${token()}` } });
  const blob = await res.blob();
  const a = h("a", { href: URL.createObjectURL(blob), download: name });
  document.body.append(a); a.click(); a.remove();
}

/** Reads a server-sent event stream with fetch (EventSource cannot send a token). */
async function follow(path, each, live) {
  const controller = new AbortController();
  stream = controller;
  for (let delay = 1000; !controller.signal.aborted; delay = Math.min(delay * 2, 30000)) {
    try {
      const res = await fetch(`/api/v1${path}`, { headers: { Authorization: `Bearer ${token()}` }, signal: controller.signal });
      if (!res.ok) throw new Error(`HTTP ${res.status}`);
      live.textContent = "Live: statuses update by themselves.";
      delay = 1000;
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end); buffer = buffer.slice(end + 2);
          let event = "message"; const data = [];
          for (const line of block.split("\n")) {
            if (line.startsWith("event:")) event = line.slice(6).trim();
            else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
          }
          if (data.length) each(event, data.join("\n"));
        }
      }
    } catch (e) {
      if (controller.signal.aborted) return;
      live.textContent = `Live updates interrupted (${e.message}); reconnecting…`;
    }
    await new Promise((r) => setTimeout(r, delay));
  }
}

// ---- a user ----

function duration(secs) {
  if (secs === null || secs === undefined) return "–";
  if (secs < 90) return `${secs} s`;
  if (secs < 5400) return `${Math.round(secs / 60)} min`;
  return `${Math.round(secs / 360) / 10} h`;
}

function when(ms) { return ms ? new Date(ms).toLocaleString() : "never"; }

async function userPage(batchId, userId) {
  const u = await api("GET", `/batches/${encodeURIComponent(batchId)}/users/${encodeURIComponent(userId)}`);
  const facts = h("ul", { class: "summary", "aria-label": "Facts" },
    h("li", {}, statusCell(u)),
    h("li", {}, `${u.copied} copied`), h("li", {}, `${u.skipped} skipped`),
    h("li", {}, `Rate: ${u.rate_messages_per_sec === null ? "–" : `${u.rate_messages_per_sec} messages/s`}`),
    h("li", {}, `Time left: ${duration(u.eta_secs)}`),
    h("li", {}, `Last synced: ${when(u.last_synced_ms)}`),
    h("li", {}, `Next sync: ${when(u.next_sync_ms)}`));
  const folders = h("div", { class: "table-wrap" }, h("table", {},
    h("caption", { class: "visually-hidden" }, "Folders"),
    h("thead", {}, h("tr", {}, ["Source folder", "Target folder", "State", "At target", "Skipped", "Verified"]
      .map((t) => h("th", { scope: "col", class: ["At target", "Skipped"].includes(t) ? "num" : null }, t)))),
    h("tbody", {}, u.folders.map((f) => h("tr", {},
      h("td", {}, f.source), h("td", {}, f.target),
      h("td", {}, f.state, f.reason ? h("div", { class: "hint" }, f.reason) : null),
      h("td", { class: "num" }, String(f.at_target)), h("td", { class: "num" }, String(f.skipped)),
      h("td", {}, f.verified ? "yes" : "not yet"))))));
  const skipped = u.skipped_messages.length
    ? h("div", { class: "table-wrap" }, h("table", {},
      h("caption", { class: "visually-hidden" }, "Skipped messages"),
      h("thead", {}, h("tr", {}, ["Folder", "Size", "Date", "Reason"].map((t) => h("th", { scope: "col", class: t === "Size" ? "num" : null }, t)))),
      h("tbody", {}, u.skipped_messages.map((m) => h("tr", {},
        h("td", {}, m.folder), h("td", { class: "num" }, `${m.size} bytes`), h("td", {}, m.date), h("td", {}, m.reason))))))
    : h("p", {}, "No message was skipped.");
  show(u.id, h("p", {}, h("a", { href: `#/batch/${encodeURIComponent(batchId)}` }, "← Back to the migration")),
    u.reason ? h("p", { class: "error" }, u.reason) : null,
    facts, h("h2", {}, "Folders"), folders, h("h2", {}, "Skipped messages"), skipped);
}

// ---- routing ----

async function route() {
  const hash = location.hash || "#/";
  document.getElementById("sign-out").hidden = !token();
  if (!token() && hash !== "#/signin") { go("#/signin"); return; }
  const parts = hash.slice(2).split("/").map(decodeURIComponent);
  try {
    if (hash === "#/signin") signIn();
    else if (parts[0] === "new") await newMigration();
    else if (parts[0] === "batch" && parts[2] === "user") await userPage(parts[1], parts[3]);
    else if (parts[0] === "batch") await batchPage(parts[1]);
    else await home();
  } catch (e) {
    if (e.status !== 401) show("Something went wrong", errorBox(e), h("p", {}, h("a", { href: "#/" }, "Back to the migrations")));
  }
}

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", () => {
  document.getElementById("sign-out").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); go("#/signin"); });
  route();
});
