// One chip per character (grapheme). Byte-level BPE splits a Chinese or Hindi character over several tokens; the
// API gives each token the text it adds in context: "" for a token that ends inside a character, the
// whole character on the token that completes it. The page shows such a run as one chip: its text is
// the character, its positions are all the tokens', and its latents are merged (each latent once, at
// its strongest normalized activation over the run). app.js calls groupChars() before drawing tokens
// and groupExample() before drawing a latent page's example segment.
"use strict";

function mergeRun(run) {
  if (run.length === 1) return run[0];
  const best = new Map();
  for (const t of run) {
    for (const l of t.latents || []) {
      const b = best.get(l.neuron_id);
      if (!b || l.norm_activation > b.norm_activation) best.set(l.neuron_id, l);
    }
  }
  const latents = [...best.values()].sort((a, b) => b.norm_activation - a.norm_activation);
  const last = run[run.length - 1];
  return Object.assign({}, last, {
    text: run.map((t) => t.text).join(""),
    position: run[0].position,
    positions: run.map((t) => t.position),
    special: run.every((t) => t.special),
    n_active: Math.max(latents.length, ...run.map((t) => t.n_active || 0)),
    latents,
  });
}

// Tokens -> chips: a run of "" tokens joins the token that completes the character, and a token that
// starts with a combining mark (a Hindi vowel sign, a virama) joins the chip before it (same role only).
const COMBINING = /^\p{M}/u;
function groupChars(tokens) {
  const runs = [];
  let run = [];
  const close = () => {
    const prev = runs[runs.length - 1];
    const text = run.map((t) => t.text).join("");
    if (prev && prev[0].role === run[0].role && COMBINING.test(text)) prev.push(...run);
    else runs.push(run);
    run = [];
  };
  for (const t of tokens) {
    if (run.length && run[0].role !== t.role) close();
    run.push(t);
    if (t.text !== "") close();
  }
  if (run.length) close();  // a character left unfinished at the end
  return runs.map(mergeRun);
}

// "#12" for one token, "#12–14" for a chip of several.
function positionsLabel(t) {
  const ps = t.positions || [t.position];
  return ps.length > 1 ? `#${ps[0]}–${ps[ps.length - 1]}` : `#${t.position}`;
}

// A latent page's example: token texts and activations -> characters and their strongest activation.
function groupExample(tokens, activations) {
  const texts = [], acts = [];
  let text = "", act = 0, open = false;
  tokens.forEach((t, i) => {
    text += t;
    act = Math.max(act, activations[i] || 0);
    open = true;
    if (t !== "") { texts.push(text); acts.push(act); text = ""; act = 0; open = false; }
  });
  if (open) { texts.push(text); acts.push(act); }
  return { tokens: texts, activations: acts };
}
