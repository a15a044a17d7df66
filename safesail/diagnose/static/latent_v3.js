// The latent page's neuron-DB v3 sections: explanations in every language side by side, every scorer's
// score with its interval and controls, and the causal checks (steering, ablation, refusal).
// app.js calls renderLatentV3(latent) after filling the page; scoreOf() serves the min-score filter.
"use strict";

function v3el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const c of kids) if (c) e.appendChild(c);
  return e;
}
function v3fmt(x, d) { return x === null || x === undefined ? "—" : Number(x).toFixed(d === undefined ? 3 : d); }

// The score of one scorer kind on a latent row of the diagnose response (simulation = `score`).
function scoreOf(lat, kind) {
  if (!kind || kind === "simulation") return lat.score;
  const s = (lat.scores || {})[kind];
  return s === undefined ? null : s;
}

function renderLatentV3(l) {
  const langs = Object.entries(l.explanations || {});
  const lbox = document.getElementById("latent-langs");
  const sbox = document.getElementById("latent-scores");
  const ebox = document.getElementById("latent-effects");
  for (const b of [lbox, sbox, ebox]) while (b.firstChild) b.removeChild(b.firstChild);
  if (langs.length > 1) {
    document.getElementById("latent-explanation").hidden = true;
    for (const [lang, text] of langs) {
      lbox.appendChild(v3el("div", { class: "lang-explanation", "data-lang": lang },
        v3el("span", { class: "lang-code", text: lang }),
        v3el("span", { class: "explanation", text: text === null ? "(no explanation)" : text })));
    }
  } else document.getElementById("latent-explanation").hidden = false;

  const kinds = Object.entries(l.scores || {});
  if (kinds.length) {
    const head = v3el("tr", {}, ...["scorer", "value", "95% interval", "shuffled control", "constant control",
      "beats shuffled", "examples", "LLM calls", "tokens (prompt / completion)", "status"].map((h) => v3el("th", { text: h })));
    const table = v3el("table", { class: "scores" }, v3el("thead", {}, head));
    const body = v3el("tbody");
    for (const [kind, s] of kinds) {
      const ci = s.ci_low === null || s.ci_low === undefined ? "—" : `[${v3fmt(s.ci_low)}, ${v3fmt(s.ci_high)}]`;
      const beats = s.beats_shuffled === null || s.beats_shuffled === undefined ? "—" : (s.beats_shuffled ? "yes" : "no");
      const row = v3el("tr", { "data-kind": kind },
        v3el("td", { text: kind }), v3el("td", { class: "num", text: v3fmt(s.value) }), v3el("td", { text: ci }),
        v3el("td", { class: "num", text: v3fmt(s.control_shuffled) }), v3el("td", { class: "num", text: v3fmt(s.control_constant) }),
        v3el("td", { text: beats }), v3el("td", { class: "num", text: v3fmt(s.n_examples, 0) }),
        v3el("td", { class: "num", text: v3fmt(s.llm_calls, 0) }),
        v3el("td", { class: "num", text: `${v3fmt(s.prompt_tokens, 0)} / ${v3fmt(s.completion_tokens, 0)}` }),
        v3el("td", { text: (s.status || "—") + (s.failure ? ` (${s.failure})` : "") }));
      body.appendChild(row);
    }
    table.appendChild(body);
    sbox.appendChild(table);
  } else sbox.appendChild(v3el("p", { class: "muted", text: "No scores in the database." }));

  const effects = l.verify_effects || [];
  if (effects.length) {
    const head = v3el("tr", {}, ...["check", "metric", "against", "domain", "language", "value", "95% interval", "n"]
      .map((h) => v3el("th", { text: h })));
    const table = v3el("table", { class: "effects" }, v3el("thead", {}, head));
    const body = v3el("tbody");
    for (const e of effects) {
      const ci = e.ci_low === null ? "—" : `[${v3fmt(e.ci_low)}, ${v3fmt(e.ci_high)}]`;
      body.appendChild(v3el("tr", {}, v3el("td", { text: e.check }), v3el("td", { text: e.metric }),
        v3el("td", { text: e.target === "latent" ? "—" : e.target }), v3el("td", { text: e.domain || "all" }),
        v3el("td", { text: e.lang || "all" }), v3el("td", { class: "num", text: v3fmt(e.value) }),
        v3el("td", { text: ci }), v3el("td", { class: "num", text: v3fmt(e.n, 0) })));
    }
    table.appendChild(body);
    ebox.appendChild(table);
  } else ebox.appendChild(v3el("p", { class: "muted", text: "No causal checks in the database (safesail verify)." }));
}
