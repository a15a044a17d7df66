// Steer control of the diagnose page: pick latents (from a token's table or typed as layer_index),
// choose ablate / clamp / add with a strength, regenerate through /api/steer/stream and show the
// original and intervened answers side by side, each with its per-token latents and refusal score.
// Uses app.js's helpers (el, clear, fmt, filters, renderTokens, latentTable, diagnoseStreaming, showError);
// everything is put on the page as text.
"use strict";

const steerState = { edits: [], result: null };
const NEURON_ID = /^\d+_\d+$/;

function steerEditLabel(e) {
  return e.mode === "ablate" ? `${e.neuron_id} ablate` : `${e.neuron_id} ${e.mode} ${e.strength}`;
}

function renderSteerEdits() {
  const list = clear($("steer-edits"));
  steerState.edits.forEach((e, i) => {
    list.appendChild(el("li", { "data-neuron": e.neuron_id }, steerEditLabel(e),
      el("button", { type: "button", title: "remove", "aria-label": "remove", onclick: () => {
        steerState.edits.splice(i, 1);
        renderSteerEdits();
      } }, "×")));
  });
  $("steer-run").disabled = !steerState.edits.length;
}

function addSteerEdit() {
  const id = $("steer-id").value.trim();
  const mode = $("steer-mode").value;
  const strength = Number($("steer-strength").value);
  if (!NEURON_ID.test(id)) { showError(`latent id “${id}” is not of the form layer_index (e.g. 14_3598); pick one from a token's table.`); return; }
  if (mode !== "ablate" && !Number.isFinite(strength)) { showError("the strength is not a number; type e.g. 4."); return; }
  showError("");
  steerState.edits.push({ neuron_id: id, mode, strength: mode === "ablate" ? 0 : strength });
  renderSteerEdits();
}

// A "steer" button in the neuron cell of every row of the token latent table (app.js renders it).
function addPickButtons() {
  const table = document.querySelector("#latent-table table.latents");
  if (!table || table.dataset.steer) return;
  table.dataset.steer = "1";
  table.querySelectorAll("tbody tr").forEach((row) => {
    const cell = row.querySelector("td");
    const link = cell && cell.querySelector("a");
    if (!link) return;
    const id = link.textContent;
    cell.appendChild(el("button", { type: "button", class: "steer-pick", "data-neuron": id, title: "steer this latent",
      onclick: () => { $("steer-id").value = id; $("steer-id").focus(); } }, "steer"));
  });
}

function renderSteerSide(box, side, label) {
  const ref = box.querySelector(".refusal");
  const answer = box.querySelector(".answer");
  if (!side) { ref.textContent = ""; answer.textContent = "(not requested)"; return; }
  ref.textContent = `${label} · refusal log-prob ${fmt(side.refusal.logprob, 2)} · refusal phrase: ` +
    (side.refusal.refused ? "yes" : "no") + (side.cached ? " · cached" : "");
  ref.classList.toggle("refused", side.refusal.refused);
  answer.textContent = side.result.answer;
  const table = box.querySelector(".side-table");
  const f = filters();
  renderTokens(box.querySelector(".tokens"), side.result.tokens.filter((t) => t.role === "answer" && !t.special),
    (t) => { clear(table).appendChild(el("p", { class: "small", text: `Token #${t.position} “${t.text}”` }));
             table.appendChild(latentTable(t, f)); }, f);
}

async function runSteer() {
  const query = $("query").value;
  if (!query.trim()) { showError("type a query first."); return; }
  if (!steerState.edits.length) return;
  showError("");
  $("steer-run").disabled = true;
  $("steer-status").textContent = "regenerating…";
  $("steer-result").hidden = false;
  delete $("steer-result").dataset.done;
  const boxes = { original: $("steer-original"), steered: $("steer-steered") };
  for (const b of Object.values(boxes)) {
    b.querySelector(".answer").textContent = "";
    b.querySelector(".refusal").textContent = "";
    clear(b.querySelector(".tokens")); clear(b.querySelector(".side-table"));
  }
  try {
    const body = { query, edits: steerState.edits, max_new_tokens: Number($("max-new-tokens").value) || null };
    const resp = await diagnoseStreaming(body, (text, obj) => {
      const b = boxes[obj.side];
      if (b) b.querySelector(".answer").textContent += text;
    }, "/api/steer/stream");
    steerState.result = resp;
    renderSteerSide(boxes.original, resp.original, "original");
    renderSteerSide(boxes.steered, resp.steered, resp.edits.map(steerEditLabel).join(", "));
    $("steer-status").textContent = `${fmt(resp.steer_s, 2)} s`;
    $("steer-result").dataset.done = "1";
  } catch (e) {
    showError(e.message);
    $("steer-status").textContent = "";
  } finally {
    $("steer-run").disabled = !steerState.edits.length;
  }
}

function startSteer() {
  $("steer-add").addEventListener("click", addSteerEdit);
  $("steer-run").addEventListener("click", runSteer);
  $("steer-id").addEventListener("keydown", (ev) => { if (ev.key === "Enter") { ev.preventDefault(); addSteerEdit(); } });
  new MutationObserver(addPickButtons).observe($("latent-table"), { childList: true, subtree: true });
  renderSteerEdits();
}

document.addEventListener("DOMContentLoaded", startSteer);
