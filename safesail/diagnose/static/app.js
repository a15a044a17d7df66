// Safe-SAIL diagnose page. Every piece of data is put on the page with textContent
// (never as HTML markup), so queries, tokens, explanations and examples render as text.
"use strict";

let DOMAINS = [];  // the safety domains, from /api/info (safesail/domains.py)
const state = { info: null, result: null, pinned: null, presets: [], compare: null };

// ---- small DOM helpers ---------------------------------------------------------
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
  }
  return node;
}
const $ = (id) => document.getElementById(id);
function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); return node; }
function fmt(x, d = 2) { return x === null || x === undefined ? "—" : Number(x).toFixed(d); }

function showError(msg) {
  const box = $("error");
  box.textContent = msg || "";
  box.hidden = !msg;
}

async function api(path, body) {
  const opts = body === undefined ? {} : {
    method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) };
  const r = await fetch(path, opts);
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  if (!r.ok) throw new Error((data && data.message) || `request failed (${r.status})`);
  return data;
}

// ---- filters ----------------------------------------------------------------------
function filters() {
  const domains = DOMAINS.filter((d) => $("f-" + d).checked);
  return { domains, minScore: Number($("min-score").value) || 0, minNorm: Number($("min-norm").value) || 0,
           scoreKind: $("score-kind") ? $("score-kind").value : "simulation" };
}
function passes(lat, f) {
  if (f.domains.length && !lat.tags.some((t) => f.domains.includes(t))) return false;
  if (f.minScore > 0) { const sc = scoreOf(lat, f.scoreKind); if (sc === null || sc < f.minScore) return false; }
  return lat.norm_activation > f.minNorm;
}
function safetyDomain(tags) { return (tags || []).find((t) => DOMAINS.includes(t)) || null; }
function strongest(token, f) {
  let best = null;
  for (const lat of token.latents) {
    if (!passes(lat, f) || !safetyDomain(lat.tags)) continue;
    if (!best || lat.norm_activation > best.norm_activation) best = lat;
  }
  return best;
}
function colourToken(node, lat) {
  node.className = "tok";
  node.style.removeProperty("--a");
  if (!lat) return;
  node.classList.add("d-" + safetyDomain(lat.tags));
  node.style.setProperty("--a", String(Math.min(1, 0.15 + lat.norm_activation / 2.5)));
}

// ---- token strips -------------------------------------------------------------------
function tokenLabel(t) {
  if (t.text === "") return "·";
  return t.text.replace(/\n/g, "⏎");
}
function renderTokens(container, tokens, onPick, f) {
  clear(container);
  for (const t of groupChars(tokens)) {  // chars.js: one chip per character, however many byte tokens
    const node = el("button", { type: "button", "data-pos": t.position,
                                "data-positions": (t.positions || [t.position]).join(" "),
                                title: `${positionsLabel(t)}  ${t.n_active} latents` }, tokenLabel(t));
    colourToken(node, strongest(t, f));
    node.addEventListener("mouseenter", () => onPick(t, false));
    node.addEventListener("click", () => onPick(t, true));
    container.appendChild(node);
  }
}

function latentTable(token, f) {
  const rows = token.latents.filter((l) => passes(l, f));
  if (!rows.length) return el("p", { class: "muted", text: "No database latent passes the filters on this token." });
  const kind = f.scoreKind || "simulation";
  const head = el("tr", {}, ...["neuron", "layer", "index", "normalized", "explanation",
                                kind === "simulation" ? "score" : `${kind} score`, "tags"]
    .map((h) => el("th", { text: h })));
  const body = rows.map((l) => el("tr", {},
    el("td", {}, el("a", { href: `#/latent/${l.layer}/${l.index}`, class: "mono", text: l.neuron_id })),
    el("td", { text: l.layer }), el("td", { text: l.index }),
    el("td", { class: "num", text: fmt(l.norm_activation) }),
    el("td", { class: "explanation", text: l.explanation === null ? "(no explanation)" : l.explanation }),
    el("td", { class: "num", text: fmt(scoreOf(l, kind)) }),
    el("td", {}, ...l.tags.map((t) => el("span", { class: "tag d-" + t, text: t })))));
  return el("table", { class: "latents" }, el("thead", {}, head), el("tbody", {}, ...body));
}

function showToken(t) {
  $("token-title").textContent = `Token ${positionsLabel(t)} “${t.text}” — ${t.n_active} database latents`;
  clear($("latent-table")).appendChild(latentTable(t, filters()));
}

function markPinned() {
  document.querySelectorAll(".tok.pinned").forEach((n) => n.classList.remove("pinned"));
  if (state.pinned !== null) {
    document.querySelectorAll(`#view-diagnose .tok[data-pos="${state.pinned}"]`).forEach((n) => n.classList.add("pinned"));
  }
}

function pickToken(t, pin) {
  if (pin) {
    state.pinned = state.pinned === t.position ? null : t.position;
    markPinned();
  } else if (state.pinned !== null) {
    return;  // a pinned table stays until another click
  }
  showToken(t);
}

function renderResult() {
  const r = state.result;
  if (!r) return;
  const f = filters();
  $("result").hidden = false;
  $("answer").textContent = r.answer;
  $("answer-note").textContent = (r.generated ? "generated" : "given") + (r.truncated ? ", cut at the limit" : "") +
    ` · ${fmt(r.timings.total_s, 2)} s`;
  renderTokens($("query-tokens"), r.tokens.filter((t) => t.role === "query"), pickToken, f);
  renderTokens($("answer-tokens"), r.tokens.filter((t) => t.role === "answer" && !t.special), pickToken, f);
  const cur = state.pinned !== null ? r.tokens[state.pinned] : null;
  if (cur) { markPinned(); showToken(cur); }
}

// POST the query to the streaming endpoint: the answer text grows while the model writes it,
// then the full per-token result arrives as the last event (also used by steer.js for /api/steer/stream).
async function diagnoseStreaming(body, onText, path = "/api/diagnose/stream") {
  const r = await fetch(path, {
    method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
  if (!r.ok) {
    let data = null;
    try { data = await r.json(); } catch (e) { data = null; }
    throw new Error((data && data.message) || `request failed (${r.status})`);
  }
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      let kind = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) kind = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      const obj = JSON.parse(data);
      if (kind === "token") onText(obj.text, obj);
      else if (kind === "result") return obj;
      else if (kind === "error") throw new Error(obj.message);
    }
  }
  throw new Error("the server closed the stream before the result; try again.");
}

async function submitQuery(ev) {
  ev.preventDefault();
  const query = $("query").value;
  if (!query.trim()) return;
  showError("");
  $("submit").disabled = true;
  $("status").textContent = "running the model…";
  try {
    $("result").hidden = false;
    $("answer").textContent = "";
    $("answer-note").textContent = "generating…";
    clear($("query-tokens")); clear($("answer-tokens"));
    state.result = await diagnoseStreaming({ query, max_new_tokens: Number($("max-new-tokens").value) || null },
                                           (piece) => { $("answer").textContent += piece; });
    state.pinned = null;
    clear($("latent-table")).appendChild(el("p", { class: "muted", text: "No token selected." }));
    $("token-title").textContent = "Token latents";
    renderResult();
    $("status").textContent = "";
  } catch (e) {
    showError(e.message);
    $("status").textContent = "";
  } finally {
    $("submit").disabled = false;
  }
}

// ---- language comparison -------------------------------------------------------------
const DEFAULT_LANGS = ["en", "zh", "hi"];
function compareInputs(queries) {
  const box = clear($("compare-inputs"));
  const entries = queries ? Object.entries(queries) : DEFAULT_LANGS.map((l) => [l, ""]);
  while (entries.length < 3) entries.push(["", ""]);
  entries.forEach(([lang, q], i) => {
    box.appendChild(el("div", { class: "lang-input" },
      el("input", { class: "lang-code", id: `cmp-lang-${i}`, value: lang, placeholder: "lang", maxlength: 16 }),
      el("textarea", { id: `cmp-q-${i}`, rows: 2, placeholder: i < 2 ? "the query in this language" : "(optional)" })));
    $(`cmp-q-${i}`).value = q;
  });
}

function latentChip(l, lang) {
  const v = lang ? l.max_norm[lang] : Math.max(...Object.values(l.max_norm));
  return el("li", {}, el("a", { href: `#/latent/${l.layer}/${l.index}`, class: "mono", text: l.neuron_id }),
            el("span", { class: "num", text: " " + fmt(v) + " " }),
            el("span", { class: "explanation", text: l.explanation === null ? "(no explanation)" : l.explanation }));
}

function renderCompare() {
  const c = state.compare;
  $("compare-result").hidden = false;
  const langs = c.languages;
  // summary table: domain x (shared, each language, partial)
  const cols = ["shared", ...langs.map((l) => `only ${l}`), ...(langs.length > 2 ? ["some"] : [])];
  const head = el("tr", {}, el("th", { text: "domain" }), ...cols.map((h) => el("th", { text: h })));
  const rows = Object.entries(c.summary).map(([d, s]) => el("tr", {},
    el("td", {}, el("span", { class: "tag d-" + d, text: d })), el("td", { class: "num", text: s.shared }),
    ...langs.map((l) => el("td", { class: "num", text: s[l] })),
    ...(langs.length > 2 ? [el("td", { class: "num", text: s.partial })] : [])));
  clear($("compare-summary")).appendChild(el("table", { class: "latents summary" }, el("thead", {}, head), el("tbody", {}, ...rows)));
  // per-language token strips side by side
  const langBox = clear($("compare-langs"));
  const f = { domains: [], minScore: 0, minNorm: 0 };
  for (const lang of langs) {
    const r = c.results[lang];
    const qBox = el("div", { class: "tokens" });
    const aBox = el("div", { class: "tokens" });
    const table = el("div", { class: "lang-table" });
    const pick = (t) => clear(table).appendChild(latentTable(t, f));
    renderTokens(qBox, r.tokens.filter((t) => t.role === "query"), pick, f);
    renderTokens(aBox, r.tokens.filter((t) => t.role === "answer" && !t.special), pick, f);
    langBox.appendChild(el("div", { class: "card lang-col", "data-lang": lang }, el("h2", { text: lang }),
      el("h3", { text: "Query" }), qBox, el("h3", { text: "Answer" }), el("p", { class: "answer", text: r.answer }), aBox, table));
  }
  // groups: domain x layer
  const gBox = clear($("compare-groups"));
  for (const g of c.groups) {
    const colsEls = [el("div", { class: "group-col" }, el("h4", { text: `shared (${g.shared.length})` }),
                        el("ul", {}, ...g.shared.slice(0, 20).map((l) => latentChip(l))))];
    for (const lang of langs) {
      const list = g.unique[lang] || [];
      colsEls.push(el("div", { class: "group-col" }, el("h4", { text: `only ${lang} (${list.length})` }),
                      el("ul", {}, ...list.slice(0, 20).map((l) => latentChip(l, lang)))));
    }
    if (langs.length > 2) {  // the summary's "some" column counts these: draw them too
      colsEls.push(el("div", { class: "group-col" }, el("h4", { text: `some (${g.partial.length})` }),
                      el("ul", {}, ...g.partial.slice(0, 20).map((l) => latentChip(l)))));
    }
    gBox.appendChild(el("div", { class: "group", "data-domain": g.domain, "data-layer": g.layer },
      el("h3", {}, el("span", { class: "tag d-" + g.domain, text: g.domain }), ` layer ${g.layer}`),
      el("div", { class: "group-cols" }, ...colsEls)));
  }
}

async function submitCompare(ev) {
  ev.preventDefault();
  const queries = {};
  for (let i = 0; i < 3; i++) {
    const lang = $(`cmp-lang-${i}`).value.trim();
    const q = $(`cmp-q-${i}`).value;
    if (lang && q.trim()) queries[lang] = q;
  }
  if (Object.keys(queries).length < 2) { showError("Give the query in at least two languages."); return; }
  showError("");
  $("compare-submit").disabled = true;
  $("compare-status").textContent = "running the model once per language…";
  try {
    state.compare = await api("/api/compare", { queries, scope: $("scope").value,
                                                max_new_tokens: Number($("cmp-max-new-tokens").value) || null });
    renderCompare();
    $("compare-status").textContent = "";
  } catch (e) {
    showError(e.message);
    $("compare-status").textContent = "";
  } finally {
    $("compare-submit").disabled = false;
  }
}

// ---- latent page ------------------------------------------------------------------------
function histogram(h) {
  const NS = "http://www.w3.org/2000/svg";
  const W = 560, H = 140;
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H + 20}`);
  svg.setAttribute("class", "hist");
  const max = Math.max(1, ...h.counts);
  const bw = W / Math.max(1, h.counts.length);
  h.counts.forEach((c, i) => {
    const r = document.createElementNS(NS, "rect");
    const bh = (H * Math.log1p(c)) / Math.log1p(max);
    r.setAttribute("x", String(i * bw)); r.setAttribute("width", String(Math.max(1, bw - 1)));
    r.setAttribute("y", String(H - bh)); r.setAttribute("height", String(bh));
    const t = document.createElementNS(NS, "title");
    t.textContent = `${fmt(h.edges[i], 3)} – ${fmt(h.edges[i + 1], 3)}: ${c}`;
    r.appendChild(t);
    svg.appendChild(r);
  });
  [[0, "start", h.edges[0]], [W, "end", h.edges[h.edges.length - 1]]].forEach(([x, anchor, v]) => {
    const t = document.createElementNS(NS, "text");
    t.setAttribute("x", String(x)); t.setAttribute("y", String(H + 15)); t.setAttribute("text-anchor", anchor);
    t.textContent = fmt(v, 3);
    svg.appendChild(t);
  });
  return svg;
}

function example(segment) {
  if (!segment.tokens.length) return el("div", { class: "example", text: segment.text });
  const ex = groupExample(segment.tokens, segment.activations);  // chars.js: whole characters
  const mx = Math.max(1e-9, ...ex.activations);
  const box = el("div", { class: "example" });
  ex.tokens.forEach((t, i) => {
    const a = ex.activations[i] || 0;
    const s = el("span", { class: "ex-tok", title: fmt(a, 3), text: t });
    if (a > 0) s.style.setProperty("--a", String(Math.min(1, a / mx)));
    box.appendChild(s);
  });
  return box;
}

async function showLatent(layer, index) {
  $("latent-title").textContent = `Latent ${layer}_${index}`;
  clear($("latent-facts")); clear($("latent-hist")); clear($("latent-examples"));
  $("latent-explanation").textContent = "loading…";
  try {
    const l = await api(`/api/latents/${encodeURIComponent(layer)}/${encodeURIComponent(index)}`);
    $("latent-title").textContent = `Latent ${l.neuron_id} (${l.hook})`;
    $("latent-explanation").textContent = l.explanation === null ? "(no explanation)" : l.explanation;
    const facts = [["score", fmt(l.score, 3)], ["density", l.density === null ? "—" : fmt(l.density, 5)],
                   ...Object.entries(l.quantiles).map(([q, v]) => [`quantile ${q}`, fmt(v, 3)])];
    const dl = $("latent-facts");
    for (const [k, v] of facts) { dl.appendChild(el("dt", { text: k })); dl.appendChild(el("dd", { text: v })); }
    dl.appendChild(el("dt", { text: "tags" }));
    dl.appendChild(el("dd", {}, ...(l.tags.length ? l.tags.map((t) => el("span", { class: "tag d-" + t, text: t }))
                                                  : [el("span", { class: "muted", text: "general" })])));
    if (l.histogram) {
      $("latent-hist").appendChild(histogram(l.histogram));
      $("latent-hist").appendChild(el("p", { class: "muted small", text: `over ${l.histogram_source || "all tokens"}, log-scaled counts` }));
    }
    else $("latent-hist").appendChild(el("p", { class: "muted", text: "No histogram in the database." }));
    if (l.examples.length) l.examples.forEach((ex) => $("latent-examples").appendChild(example(ex)));
    else $("latent-examples").appendChild(el("p", { class: "muted", text: "No example segments in the database." }));
    renderLatentV3(l);
  } catch (e) {
    $("latent-explanation").textContent = "";
    showError(e.message);
  }
}

// ---- routing and start-up ------------------------------------------------------------------
function route() {
  const parts = (location.hash || "#/diagnose").slice(2).split("/");
  const view = ["diagnose", "compare", "latent"].includes(parts[0]) ? parts[0] : "diagnose";
  for (const v of ["diagnose", "compare", "latent"]) $("view-" + v).hidden = v !== view;
  for (const v of ["diagnose", "compare"]) $("nav-" + v).classList.toggle("active", v === view);
  showError("");
  if (view === "latent") showLatent(parts[1], parts[2]);
}

function buildFilters() {
  const box = document.querySelector("#filters .domains");
  const legend = document.querySelector("#filters .legend");
  for (const d of DOMAINS) {
    box.appendChild(el("label", { class: "check" }, el("input", { type: "checkbox", id: "f-" + d }), el("span", { class: "tag d-" + d, text: d })));
    legend.appendChild(el("span", { class: "swatch d-" + d, title: d }));
  }
  legend.appendChild(el("span", { class: "muted small", text: " colour = strongest safety latent" }));
  document.querySelectorAll("#filters input, #filters select").forEach((i) => i.addEventListener("input", renderResult));
}

async function start() {
  compareInputs(null);
  $("query-form").addEventListener("submit", submitQuery);
  $("compare-form").addEventListener("submit", submitCompare);
  $("preset").addEventListener("change", () => {
    const p = state.presets.find((x) => x.id === $("preset").value);
    compareInputs(p ? p.queries : null);
  });
  window.addEventListener("hashchange", route);
  route();
  try {
    const info = await api("/api/info");
    state.info = info;
    $("model-info").textContent = `model ${info.model} · ${info.saes.length} SAEs on layers ` +
      info.saes.map((s) => s.layer).join(", ") + ` · ${info.saes.reduce((a, s) => a + s.n_db_latents, 0)} database latents`;
    $("max-new-tokens").value = info.limits.max_new_tokens;
    $("max-new-tokens").max = info.limits.max_new_tokens_limit;
    $("query").maxLength = info.limits.max_query_chars;
    DOMAINS = info.domains || [];
  } catch (e) { showError(e.message); }
  buildFilters();
  try {
    state.presets = (await api("/api/compare/presets")).presets;
    for (const p of state.presets) {
      $("preset").appendChild(el("option", { value: p.id, text: `${p.id}${p.domain ? " (" + p.domain + ")" : ""}` }));
    }
    if (state.presets.length) { $("preset").value = state.presets[0].id; compareInputs(state.presets[0].queries); }
  } catch (e) { /* presets are optional */ }
}

document.addEventListener("DOMContentLoaded", start);
