// The fleet view: one page, routed by the URL's hash, drawn from the JSON API under /api/.
// Costs are shown as the API's cost_text (formatted by the server as the reports print them),
// so the page rounds exactly as `collector report` does. Text goes in with textContent only.
"use strict";

const view = document.getElementById("view");
const live = document.getElementById("live");
const charts = [];
let redraw = null; // the current view's refresh, called again on every database change
let refreshing = false;
let pending = false;
// The dimensions the collector keeps ([attribution]): each a who-spends page and a filter.
let dimensions = [];

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const int = (n) => Number(n).toLocaleString("en-US");
const pct = (x) => (x === null || x === undefined ? "–" : (x * 100).toFixed(1) + " %");
const shortTime = (iso) => (iso ? iso.slice(0, 16).replace("T", " ") : "");
const PALETTE = ["#3559c7", "#e07b39", "#2e9d58", "#b54aa8", "#c9a227", "#3ba3b5", "#d0505a",
  "#7a6cd9", "#8a8f9c"];

async function api(path) {
  const response = await fetch(path, { headers: { Accept: "application/json" } });
  if (response.status === 401) { location.href = "/login"; throw new Error("signed out"); }
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response.json();
}

function clearCharts() {
  while (charts.length) charts.pop().destroy();
}

function stackedChart(canvas, days, series) {
  if (!window.Chart) return;
  charts.push(new window.Chart(canvas, {
    type: "bar",
    data: {
      labels: days.map((d) => d.slice(5)),
      datasets: series.map((s, i) => ({
        label: s.name, data: s.cost_usd, backgroundColor: PALETTE[i % PALETTE.length],
      })),
    },
    options: {
      animation: false, maintainAspectRatio: false,
      scales: { x: { stacked: true }, y: { stacked: true, title: { display: true, text: "USD" } } },
      plugins: { legend: { position: "bottom", labels: { boxWidth: 12 } } },
    },
  }));
}

// A session's page is #/session?id=ID: a query parameter carries any id (".", "..", "/", "?",
// "#", "%" and the rest), where a path segment would be normalised away or split.
function sessionHref(id) {
  return "#/session?" + new URLSearchParams({ id });
}

function sessionLink(id) {
  return el("a", { href: sessionHref(id), "data-testid": "session-link" }, id);
}

function sessionsTable(rows, sortable, state, onSort) {
  const columns = [
    ["id", "session", null], ["agent", "agent", null], ["user", "user", null],
    ["status", "status", null], ["model", "model", null], ["turns", "turns", "turns"],
    ["total_tokens", "tokens", "tokens"], ["cost_text", "cost (USD)", "cost"],
    ["last_active_at", "last active (UTC)", "last_active_at"],
  ];
  const numeric = new Set(["turns", "total_tokens", "cost_text"]);
  const head = el("tr", {}, columns.map(([key, label, sort]) => {
    const th = el("th", { class: numeric.has(key) ? "num" : null, "data-col": key }, label);
    if (sortable && sort) {
      th.dataset.sort = sort;
      if (state.sort === sort) th.classList.add("sorted", state.order === "asc" ? "asc" : "desc");
      th.addEventListener("click", () => onSort(sort));
    }
    return th;
  }));
  const body = rows.map((s) => el("tr", { "data-session": s.id }, columns.map(([key]) => {
    let value = s[key];
    if (key === "id") value = sessionLink(s.id);
    else if (key === "turns" || key === "total_tokens") value = int(value);
    else if (key === "last_active_at") value = shortTime(value);
    else if (key === "agent") value = s.agent ? s.agent + (s.agent_version ? " " + s.agent_version : "") : "–";
    else if (value === null || value === "") value = "–";
    return el("td", { class: numeric.has(key) ? "num" : null, "data-col": key }, value);
  })));
  return el("table", { "data-testid": "sessions-table" }, el("thead", {}, head), el("tbody", {}, body));
}

// -- overview -------------------------------------------------------------------------------

async function overview() {
  const data = await api("/api/overview");
  clearCharts();
  const t = data.tokens;
  const card = (id, label, value, note) => el("div", { class: "card" },
    el("div", { class: "label" }, label),
    el("div", { class: "value", "data-testid": id }, value),
    note ? el("div", { class: "muted" }, note) : null);
  const modelCanvas = el("canvas", { "data-testid": "chart-model" });
  const agentCanvas = el("canvas", { "data-testid": "chart-agent" });
  const kinds = [["input", t.input_tokens], ["cache read", t.cache_read_tokens],
    ["cache write", t.cache_write_tokens], ["output", t.output_tokens],
    ["reasoning (part of output)", t.reasoning_tokens], ["total", t.total_tokens]];
  view.replaceChildren(
    el("div", { class: "cards" },
      card("spend-today", "Spend today (UTC)", data.spend.today.cost_text),
      card("spend-7d", "Spend, 7 days", data.spend["7d"].cost_text),
      card("spend-30d", "Spend, 30 days", data.spend["30d"].cost_text),
      card("burn-rate", "Burn rate now", data.burn_rate.cost_text_per_hour + " / h",
        "since " + shortTime(data.burn_rate.since)),
      card("active-count", "Active sessions", int(data.active.count)),
      card("cache-hit-rate", "Cache hit rate, 30 days", pct(t.cache_hit_rate))),
    el("div", { class: "charts" },
      el("div", { class: "panel" }, el("h2", {}, "Spend per day by model"),
        el("div", { class: "chart" }, modelCanvas)),
      el("div", { class: "panel" }, el("h2", {}, "Spend per day by agent"),
        el("div", { class: "chart" }, agentCanvas))),
    el("h2", {}, "Tokens by kind, 30 days"),
    el("table", { "data-testid": "tokens-table" },
      el("thead", {}, el("tr", {}, kinds.map(([k]) => el("th", { class: "num" }, k)))),
      el("tbody", {}, el("tr", {}, kinds.map(([k, v]) =>
        el("td", { class: "num", "data-kind": k.split(" (")[0] }, int(v)))))),
    el("h2", {}, "Active now"),
    sessionsTable(data.active.sessions, false, {}, null),
  );
  stackedChart(modelCanvas, data.series.days, data.series.by_model);
  stackedChart(agentCanvas, data.series.days, data.series.by_agent);
}

// -- sessions -------------------------------------------------------------------------------

// Filters whose values come from agents: a text box offering the top values (/api/filters)
// and, as one types, the matches of a search (/api/filters/search). Never a list of every
// value, which a flood of distinct values would make megabytes long.
const VALUE_FILTERS = ["agent", "user", "model"];
const SEARCH_DELAY_MS = 200;

function hashParams() {
  const query = location.hash.split("?")[1] || "";
  return new URLSearchParams(query);
}

function setHash(base, params) {
  const text = params.toString();
  location.hash = base + (text ? "?" + text : "");
}

function changeFilter(name, value) {
  const next = hashParams();
  if (value) next.set(name, value); else next.delete(name);
  next.delete("cursor"); next.delete("back");
  setHash("#/sessions", next);
}

function valueFilter(name, params, top) {
  const listId = "values-" + name;
  const options = (values) => values.map((v) => el("option", { value: v }));
  const list = el("datalist", { id: listId, "data-values": name }, options(top));
  let timer = null;
  let asked = 0;
  const input = el("input", {
    type: "search", list: listId, placeholder: "any " + name, value: params.get(name) || "",
    "data-filter": name, autocomplete: "off",
    onchange: (e) => changeFilter(name, e.target.value.trim()),
    oninput: (e) => {
      clearTimeout(timer);
      const text = e.target.value.trim();
      if (!text) { list.replaceChildren(...options(top)); return; }
      timer = setTimeout(async () => {
        const ask = ++asked;
        try {
          const found = await api("/api/filters/search?" + new URLSearchParams({ field: name, q: text }));
          if (ask === asked) list.replaceChildren(...options(found.values));
        } catch (error) {
          if (ask === asked) list.replaceChildren(); // offers nothing; typing a value still filters
        }
      }, SEARCH_DELAY_MS);
    },
  });
  return [input, list];
}

async function sessions() {
  const params = hashParams();
  const state = { sort: params.get("sort") || "last_active_at", order: params.get("order") || "desc" };
  // A live refresh of the same view redraws the table only: the filter boxes keep their
  // focus and what is being typed, and the filter values are not fetched again.
  const keep = view.dataset.hash === location.hash && view.querySelector(".filters");
  const [options, page] = await Promise.all([
    keep ? null : api("/api/filters"), api("/api/sessions?" + params)]);
  const onSort = (sort) => {
    const next = hashParams();
    const order = state.sort === sort && state.order === "desc" ? "asc" : "desc";
    next.set("sort", sort); next.set("order", order);
    next.delete("cursor"); next.delete("back");
    setHash("#/sessions", next);
  };
  // Keyset pages: "next" carries the cursor the API gave; "back" keeps the trail of cursors.
  const trail = (params.get("back") || "").split(",").filter(Boolean);
  const pager = el("div", { class: "pager" },
    el("button", {
      "data-testid": "prev", disabled: !params.get("cursor"),
      onclick: () => {
        const next = hashParams();
        const previous = trail.pop();
        if (previous && previous !== "-") next.set("cursor", previous); else next.delete("cursor");
        if (trail.length) next.set("back", trail.join(",")); else next.delete("back");
        setHash("#/sessions", next);
      },
    }, "← newer"),
    el("span", { "data-testid": "total", class: "muted" },
      (page.total_exact ? "" : "at least ") + int(page.total) + " sessions"),
    el("button", {
      "data-testid": "next", disabled: !page.next,
      onclick: () => {
        const next = hashParams();
        next.set("back", [...trail, params.get("cursor") || "-"].join(","));
        next.set("cursor", page.next);
        setHash("#/sessions", next);
      },
    }, "older →"));
  const body = el("div", { "data-testid": "sessions-body" },
    sessionsTable(page.sessions, true, state, onSort), pager);
  if (keep) {
    view.querySelector("[data-testid=sessions-body]").replaceWith(body);
    return;
  }
  clearCharts();
  const status = el("select", {
    "data-filter": "status", onchange: (e) => changeFilter("status", e.target.value),
  }, el("option", { value: "" }, "any status"), options.status.map((v) =>
    el("option", { value: v, selected: params.get("status") === v }, v)));
  const search = el("input", {
    type: "search", placeholder: "session id starts with…", value: params.get("q") || "",
    "data-filter": "q", onchange: (e) => changeFilter("q", e.target.value.trim()),
  });
  const exportParams = new URLSearchParams(params);
  exportParams.delete("cursor"); exportParams.delete("back");
  view.replaceChildren(
    el("div", { class: "filters" }, status,
      [...VALUE_FILTERS, ...dimensions].flatMap((name) => valueFilter(name, params, options[name] || [])),
      search,
      el("a", { href: "/api/sessions.csv?" + exportParams, "data-testid": "csv" }, "CSV")),
    body);
  view.dataset.hash = location.hash;
}

// -- one session ----------------------------------------------------------------------------

async function session(id) {
  const data = await api("/api/session?" + new URLSearchParams({ id }));
  clearCharts();
  const s = data.session;
  const facts = [["status", s.status], ["kind", s.kind], ["channel", s.channel],
    ["model", s.model || "–"], ["agent", (s.agent || "–") + (s.agent_version ? " " + s.agent_version : "")],
    ["user", s.user || "–"], ["host", s.host || "–"], ["credential", s.credential || "–"],
    ...dimensions.map((d) => [d, (s.dimensions || {})[d] || "–"]),
    ["created", shortTime(s.created_at)],
    ["last active", shortTime(s.last_active_at)], ["turns", int(s.turns)],
    ["tokens", int(s.total_tokens)], ["cost (USD)", s.cost_text]];
  const models = [...new Set(data.hours.map((h) => h.model))];
  const hours = [...new Set(data.hours.map((h) => h.hour))];
  const canvas = el("canvas", { "data-testid": "chart-hours" });
  view.replaceChildren(
    el("h2", {}, "Session ", el("code", { "data-testid": "session-id" }, s.id)),
    s.goal_text ? el("p", { class: "muted" }, s.goal_text) : null,
    el("div", { class: "cards" }, facts.map(([k, v]) => el("div", { class: "card" },
      el("div", { class: "label" }, k), el("div", { class: "value", "data-fact": k }, v)))),
    el("div", { class: "panel" }, el("h2", {}, "Spend per hour by model"),
      el("div", { class: "chart" }, canvas)),
    el("h2", {}, "Usage per hour and model (UTC)"),
    el("table", { "data-testid": "hours-table" },
      el("thead", {}, el("tr", {}, ["hour", "model", "turns", "input", "cache read",
        "cache write", "output", "reasoning", "cost (USD)"].map((h, i) =>
        el("th", { class: i > 1 ? "num" : null }, h)))),
      el("tbody", {}, data.hours.map((h) => el("tr", {},
        el("td", {}, shortTime(h.hour)), el("td", {}, h.model),
        [h.turns, h.input_tokens, h.cache_read_tokens, h.cache_write_tokens, h.output_tokens,
          h.reasoning_tokens].map((n) => el("td", { class: "num" }, int(n))),
        el("td", { class: "num" }, h.cost_text))))),
  );
  stackedChart(canvas, hours.map((h) => shortTime(h)), models.map((m) => ({
    name: m, cost_usd: hours.map((hour) => {
      const row = data.hours.find((h) => h.hour === hour && h.model === m);
      return row ? row.cost_usd : 0;
    }),
  })));
}

// -- who spends -----------------------------------------------------------------------------

async function who(kind) {
  const data = await api("/api/who/" + kind);
  clearCharts();
  const headers = [kind, "models", "turns", "input", "cache read", "cache write", "output",
    "reasoning", "total tokens", "cost (USD)"];
  const numbers = (u) => [u.turns, u.input_tokens, u.cache_read_tokens, u.cache_write_tokens,
    u.output_tokens, u.reasoning_tokens, u.total_tokens].map((n) => el("td", { class: "num" }, int(n)));
  const filterLink = (value) => {
    if (kind === "host" || kind === "credential" || value === "(none)") return value;
    const params = new URLSearchParams({ [kind]: value });
    return el("a", { href: "#/sessions?" + params }, value);
  };
  view.replaceChildren(
    el("h2", {}, "Spend by " + kind + " (all time, UTC)"),
    el("table", { "data-testid": "who-table" },
      el("thead", {}, el("tr", {}, headers.map((h, i) => el("th", { class: i > 1 ? "num" : null }, h)))),
      el("tbody", {}, data.lines.map((line) => el("tr", { "data-key": line[kind] || "(none)" },
        el("td", {}, filterLink(line[kind] || "(none)")),
        el("td", {}, line.models.map((m) => m || "(none)").join(", ")),
        numbers(line), el("td", { class: "num", "data-col": "cost" }, line.cost_text)))),
      el("tfoot", {}, el("tr", { "data-key": "Total" }, el("th", {}, "Total"), el("th", {}),
        numbers(data.totals), el("th", { class: "num", "data-col": "cost" }, data.totals.cost_text)))),
  );
}

// -- budgets --------------------------------------------------------------------------------

// A bar is drawn to BAR_MAX times the limit: spend past it (or a projection) is pinned to the
// end. Widths are set through the style object (CSSOM), which the page's CSP allows, never
// as style attributes.
const BAR_MAX = 1.25;

function spendBar(line) {
  const at = (share) => (Math.min(Math.max(share, 0), BAR_MAX) / BAR_MAX * 100) + "%";
  const spent = el("div", { class: line.share >= 1 ? "spent over" : "spent", "data-testid": "bar-spent" });
  spent.style.width = at(line.share);
  const projected = el("div", {
    class: "projected", "data-testid": "bar-projected",
    title: "projected at the current burn rate: " + line.projected_text,
  });
  projected.style.left = at(line.projected_share);
  const marks = line.thresholds.map((t) => {
    const mark = el("div", { class: "mark", title: pct(t) });
    mark.style.left = at(t);
    return mark;
  });
  return el("div", { class: "bar", title: pct(line.share) + " of the limit" }, spent, marks, projected);
}

async function budgets() {
  const data = await api("/api/budgets");
  clearCharts();
  const headers = ["budget", "scope", "period", "spend", "spend (USD)", "limit (USD)", "share",
    "projected (USD)", "alerted"];
  const omitted = Object.entries(data.omitted).map(([name, n]) =>
    el("p", { class: "muted" }, `${name}: ${int(n)} more instances with less spend not shown`));
  const row = (line) => el("tr", { "data-budget": line.budget, "data-scope": line.scope },
    el("td", {}, line.budget),
    el("td", { "data-col": "scope" }, line.scope),
    el("td", {}, line.period + " from " + line.period_start.slice(0, 10) + " (" + line.timezone + ")"),
    el("td", {}, spendBar(line)),
    el("td", { class: "num", "data-col": "spend" }, line.spend_text),
    el("td", { class: "num", "data-col": "limit" }, line.limit_text),
    el("td", { class: "num", "data-col": "share" }, pct(line.share)),
    el("td", { class: "num", "data-col": "projected" }, line.projected_text),
    el("td", { class: "num", "data-col": "alerted" }, line.alerted.map(pct).join(", ") || "–"));
  const table = el("table", { "data-testid": "budgets-table" },
    el("thead", {}, el("tr", {}, headers.map((h, i) => el("th", { class: i > 3 ? "num" : null }, h)))),
    el("tbody", {}, data.budgets.map(row)));
  view.replaceChildren(
    el("h2", {}, "Budgets, current period"),
    data.budgets.length ? table : el("p", { class: "muted", "data-testid": "no-budgets" },
      "No budgets configured: add [[budgets]] to the collector's config."),
    omitted,
  );
}

// -- routing and live updates ---------------------------------------------------------------

function sessionId(parts) {
  // #/session?id=ID; #/session/ID (links from before) still opens ids a path segment holds.
  const id = hashParams().get("id");
  if (id !== null) return id;
  try { return parts[1] ? decodeURIComponent(parts.slice(1).join("/")) : null; }
  catch { return null; }
}

function route() {
  const path = location.hash.replace(/^#/, "").split("?")[0] || "/";
  const parts = path.split("/").filter(Boolean);
  let current = "overview";
  delete view.dataset.hash; // a new view: drawn whole
  if (parts[0] === "sessions") { current = "sessions"; redraw = sessions; }
  else if (parts[0] === "session" && sessionId(parts) !== null) {
    current = "sessions";
    const id = sessionId(parts);
    redraw = () => session(id);
  } else if (parts[0] === "who" && ["agent", "user", "host", "credential", ...dimensions].includes(parts[1])) {
    current = parts[1]; redraw = () => who(parts[1]);
  } else if (parts[0] === "budgets") { current = "budgets"; redraw = budgets; }
  else { redraw = overview; }
  for (const a of document.querySelectorAll("header nav a")) {
    a.classList.toggle("current", a.dataset.nav === current);
  }
  refresh();
}

async function refresh() {
  // One refresh at a time; a change during one asks for exactly one more after it.
  if (refreshing) { pending = true; return; }
  refreshing = true;
  try {
    await redraw();
    document.body.dataset.refreshed = String(Date.now());
  } catch (error) {
    view.replaceChildren(el("p", { class: "error" }, String(error.message || error)));
  } finally {
    refreshing = false;
    if (pending) { pending = false; refresh(); }
  }
}

function listen() {
  const events = new EventSource("/api/events");
  events.addEventListener("hello", () => { live.textContent = "live"; live.classList.add("on"); });
  events.addEventListener("commit", () => refresh());
  events.onerror = () => { live.textContent = "reconnecting…"; live.classList.remove("on"); };
}

// Signed in with a token: say by which one, and offer to sign out (a POST form: the server
// refuses one posted from another site).
async function signedIn() {
  const state = await api("/api/auth");
  if (!state.auth) return;
  document.getElementById("signed-in").textContent = state.token ? "signed in as " + state.token : "";
  document.getElementById("signout").hidden = false;
}

// A nav link per dimension, after the built-in ones; its text is the name, as textContent.
async function loadDimensions() {
  try {
    dimensions = (await api("/api/dimensions")).dimensions;
  } catch (error) {
    dimensions = []; // the built-in pages still work
  }
  const nav = document.querySelector("header nav");
  for (const name of dimensions) {
    nav.append(el("a", { href: "#/who/" + encodeURIComponent(name), "data-nav": name }, name.replace(/_/g, " ")));
  }
}

window.addEventListener("hashchange", route);
loadDimensions().then(() => { route(); listen(); });
signedIn();
