// The pipeline board: columns of POST /api/contacts, per-column paging on scroll, filters kept in
// the URL, live updates by polling each column with If-None-Match (304 when unchanged).
"use strict";
const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "pb-token";
const POLL_MS = 1000;
const PAGE_SIZE = 25;
const state = { columns: [], kind: "Contact", timer: null, generation: 0, lastChange: null };
window.pbBoard = state; // for the browser tests and the console

function token() { return sessionStorage.getItem(TOKEN_KEY); }

function showSignin(why) {
  sessionStorage.removeItem(TOKEN_KEY);
  stopPolling();
  $("signin").hidden = false;
  $("filters").hidden = true;
  $("signout").hidden = true;
  $("board").replaceChildren();
  $("signin-why").textContent = why || "Paste a bearer token (JWT) for your org.";
  fetch("/api/demo/users").then((r) => (r.ok ? r.json() : null)).then((users) => {
    if (!users || !users.length) return;
    $("demo").hidden = false;
    $("demo-user").replaceChildren(...users.map((u) => {
      const o = document.createElement("option");
      o.value = JSON.stringify({ orgId: u.orgId, userId: u.userId });
      o.textContent = u.label;
      return o;
    }));
  }).catch(() => {});
}

function signedIn() {
  $("signin").hidden = true;
  $("filters").hidden = false;
  $("signout").hidden = false;
  loadBoard();
}

// ---- filters <-> URL <-> request body ----
const FIELDS = ["pipelineType", "pipelineId", "ownerFilter", "owner", "assignee", "source", "createdFrom", "createdTo",
  "messageStatus", "quietValue", "quietUnit", "messageFrom", "messageTo", "bulkOnly", "stages", "search"];

function readUrl() {
  const q = new URLSearchParams(location.search);
  const f = $("filters");
  for (const name of FIELDS) {
    const el = f.elements[name];
    if (!el) continue;
    if (el.type === "checkbox") el.checked = q.get(name) === "true";
    else if (q.has(name)) el.value = q.get(name);
  }
}

function writeUrl() {
  const q = new URLSearchParams();
  const f = $("filters");
  for (const name of FIELDS) {
    const el = f.elements[name];
    const v = el.type === "checkbox" ? (el.checked ? "true" : "") : el.value.trim();
    if (v && !(name === "pipelineType" && v === "Contact") && !(name === "quietUnit" && v === "days")) q.set(name, v);
  }
  const s = q.toString();
  history.replaceState(null, "", s ? "?" + s : location.pathname);
}

const list = (s) => s.split(",").map((x) => x.trim()).filter(Boolean);
const day = (d, end) => (d ? new Date(d + (end ? "T23:59:59.999Z" : "T00:00:00.000Z")).toISOString() : undefined);

function requestBody(extra) {
  const f = $("filters").elements;
  const b = { size: PAGE_SIZE, pipelineType: f.pipelineType.value };
  if (f.pipelineId.value.trim()) b.pipelineId = f.pipelineId.value.trim();
  if (f.ownerFilter.value) b.ownerFilter = f.ownerFilter.value;
  if (list(f.owner.value).length) b.owner = list(f.owner.value);
  if (list(f.assignee.value).length) b.assignee = list(f.assignee.value);
  if (f.source.value.trim()) b.source = f.source.value.trim();
  if (f.createdFrom.value || f.createdTo.value) b.createdDateRange = { start: day(f.createdFrom.value), end: day(f.createdTo.value, true) };
  if (f.messageStatus.value) b.messageStatus = f.messageStatus.value;
  if (f.quietValue.value) b.lastMessageTimeRange = { value: Number(f.quietValue.value), unit: f.quietUnit.value };
  if (f.messageFrom.value || f.messageTo.value) b.lastMessageDateRange = { start: day(f.messageFrom.value), end: day(f.messageTo.value, true) };
  if (f.bulkOnly.checked) b.bulkOnly = true;
  if (list(f.stages.value).length) b.stages = list(f.stages.value);
  if (f.search.value.trim()) b.search = f.search.value.trim();
  return Object.assign(b, extra || {});
}

// ---- API ----
class ApiError extends Error {
  constructor(status, body) { super((body && body.error && body.error.message) || "HTTP " + status); this.status = status; this.body = body; }
}

// The token's org, read (not verified: the API does that) for the x-org-id header a load
// balancer routes by (README, Scaling).
function orgOfToken() {
  try {
    const payload = token().split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(payload)).orgId || null;
  } catch (e) { return null; }
}

async function ask(body, etag) {
  const headers = { "content-type": "application/json", authorization: "Bearer " + token() };
  const org = orgOfToken();
  if (org) headers["x-org-id"] = org;
  if (etag) headers["if-none-match"] = etag;
  const r = await fetch("/api/contacts", { method: "POST", headers, body: JSON.stringify(body) });
  if (r.status === 304) return { notModified: true, etag };
  const json = await r.json().catch(() => null);
  if (!r.ok) throw new ApiError(r.status, json);
  return { json, etag: r.headers.get("etag") };
}

function explain(e) {
  if (e.status === 401) { showSignin("Your token is missing, invalid or expired (401): sign in again."); return; }
  const what = {
    404: "No such pipeline in your organization (404).",
    503: "Neither the projection nor MongoDB can answer right now (503); the board retries.",
    400: "The filters are not valid (400): ",
  }[e.status] || "The board could not be loaded: ";
  const msg = document.createElement("p");
  msg.className = "state error";
  msg.dataset.status = e.status || "";
  msg.textContent = what.endsWith(": ") ? what + e.message : what;
  $("board").replaceChildren(msg);
}

// ---- rendering ----
function cardElement(c) {
  const li = document.createElement("li");
  li.className = "card";
  li.dataset.id = c._id;
  const name = c.fullName || [c.firstName, c.lastName].filter(Boolean).join(" ") || "(no name)";
  const phones = (c.phoneNumbers || []).map((p) => p.value).filter(Boolean).join(", ");
  const when = c.lastMessageAt ? new Date(c.lastMessageAt).toLocaleString() : "no message";
  li.innerHTML = `<strong></strong><span class="phones"></span><span class="meta"></span>`;
  li.querySelector("strong").textContent = name;
  li.querySelector(".phones").textContent = phones;
  li.querySelector(".meta").textContent = [c.owner ? "owner " + c.owner.slice(-6) : "no owner", c.source, when].filter(Boolean).join(" · ");
  return li;
}

function renderColumn(col) {
  col.el.querySelector(".total").textContent = col.total;
  const ul = col.el.querySelector("ul");
  ul.replaceChildren(...col.cards.map(cardElement));
  const empty = col.el.querySelector(".empty");
  empty.hidden = col.total > 0;
}

function renderOps(meta) {
  if (!meta) return;
  const parts = [`answered by ${meta.answeredBy}${meta.route ? " (" + meta.route + ")" : ""}`];
  if (meta.reason) parts.push("reason " + meta.reason);
  if (meta.projectionLag !== undefined) parts.push("projection lag " + meta.projectionLag + " events");
  if (state.lastChange) parts.push("last change seen " + state.lastChange.toLocaleTimeString());
  $("ops").textContent = parts.join(" · ");
  $("ops").dataset.answeredBy = meta.answeredBy;
}

async function loadBoard() {
  const generation = ++state.generation;
  stopPolling();
  writeUrl();
  const board = $("board");
  board.setAttribute("aria-busy", "true");
  const loading = document.createElement("p");
  loading.className = "state loading";
  loading.textContent = "Loading the board…";
  board.replaceChildren(loading);
  const t0 = performance.now();
  let answer;
  try {
    answer = await ask(requestBody());
  } catch (e) {
    board.setAttribute("aria-busy", "false");
    if (generation !== state.generation) return;
    explain(e);
    // Neither path could answer: try again in a while (a newer filter change cancels this).
    if (e.status === 503) setTimeout(() => { if (generation === state.generation) loadBoard(); }, 5000);
    return;
  }
  if (generation !== state.generation) return; // a newer filter change won
  const t1 = performance.now();
  const data = answer.json.data;
  state.kind = requestBody().pipelineType;
  state.columns = Object.keys(data).map((name) => ({
    name,
    id: answer.json.stageIdByName[name],
    total: data[name].total,
    cards: data[name].contacts,
    pages: 1,
    etag: null,
    loading: false,
    el: null,
  }));
  const cols = state.columns.map((col) => {
    const section = document.createElement("section");
    section.className = "column";
    section.dataset.stage = col.name;
    section.innerHTML = `<h2><span class="name"></span> <span class="total"></span></h2><p class="empty state">No cards</p><ul></ul>`;
    section.querySelector(".name").textContent = col.name;
    col.el = section;
    section.querySelector("ul").addEventListener("scroll", (ev) => {
      const ul = ev.target;
      if (ul.scrollTop + ul.clientHeight >= ul.scrollHeight - 40) nextPage(col);
    });
    renderColumn(col);
    return section;
  });
  board.replaceChildren(...cols);
  if (!cols.length) {
    const p = document.createElement("p");
    p.className = "state empty";
    p.textContent = "This pipeline has no stages.";
    board.replaceChildren(p);
  }
  board.setAttribute("aria-busy", "false");
  renderOps(answer.json.meta);
  const t2 = performance.now();
  window.pbTiming = { answerMs: t1 - t0, renderMs: t2 - t1 };
  startPolling();
}

/// The column's next page, appended (the request's per-stage `page` map).
async function nextPage(col) {
  if (col.loading || col.cards.length >= col.total) return;
  col.loading = true;
  try {
    const page = col.pages + 1;
    const { json } = await ask(requestBody({ stages: [col.name], page: { [col.name]: page } }));
    const bucket = json.data[col.name];
    const seen = new Set(col.cards.map((c) => c._id));
    col.cards = col.cards.concat(bucket.contacts.filter((c) => !seen.has(c._id)));
    col.total = bucket.total;
    col.pages = page;
    const ul = col.el.querySelector("ul");
    const top = ul.scrollTop;
    renderColumn(col);
    ul.scrollTop = top;
    col.el.dataset.pages = page;
  } catch (e) {
    explain(e);
  } finally {
    col.loading = false;
  }
}

/// Each column's first page, asked with its ETag: an unchanged column costs a 304 and no work here.
async function poll() {
  const generation = state.generation;
  for (const col of state.columns) {
    try {
      const r = await ask(requestBody({ stages: [col.name] }), col.etag);
      if (generation !== state.generation) return;
      if (r.notModified) continue;
      // The first poll of a column learns its ETag (the board was loaded in one request); it
      // renders too, in case the column changed since.
      col.etag = r.etag;
      renderOps(r.json.meta);
      const bucket = r.json.data[col.name];
      const same = bucket.total === col.total && bucket.contacts.length <= col.cards.length &&
        bucket.contacts.every((c, i) => JSON.stringify(c) === JSON.stringify(col.cards[i]));
      if (same) continue;
      col.total = bucket.total;
      col.cards = bucket.contacts;
      col.pages = 1;
      state.lastChange = new Date();
      renderColumn(col);
    } catch (e) {
      if (e.status === 401 || e.status === 404) { explain(e); return; }
    }
  }
  if (generation === state.generation) state.timer = setTimeout(poll, POLL_MS);
}

function startPolling() { stopPolling(); state.timer = setTimeout(poll, POLL_MS); }
function stopPolling() { if (state.timer) clearTimeout(state.timer); state.timer = null; }

// ---- wiring ----
let debounce = null;
$("filters").addEventListener("input", (ev) => {
  clearTimeout(debounce);
  debounce = setTimeout(loadBoard, ev.target.name === "search" ? 300 : 150);
});
$("filters").addEventListener("submit", (ev) => ev.preventDefault());
$("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const t = $("token").value.trim();
  if (!t) return;
  sessionStorage.setItem(TOKEN_KEY, t);
  signedIn();
});
$("demo-go").addEventListener("click", async () => {
  const r = await fetch("/api/demo/token", { method: "POST", headers: { "content-type": "application/json" }, body: $("demo-user").value });
  if (!r.ok) return;
  sessionStorage.setItem(TOKEN_KEY, (await r.json()).token);
  signedIn();
});
$("signout").addEventListener("click", () => showSignin("Signed out."));
readUrl();
if (token()) signedIn(); else showSignin();
