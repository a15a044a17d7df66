"""The latent page's neuron-DB v3 data: every language's explanation, every scorer kind with its controls and
the causal checks, through the JSON API and in a real headless Chromium; the min-score filter takes a kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from diagnose_helpers import LiveServer, build_tiny_db, make_engine
from safesail.diagnose.server import create_app
from safesail.interpret.scoring.records import ScoreRecord
from safesail.neurondb import NeuronDB, import_safesail as imp, load_verify, rows
from safesail.verify.records import Effect, EffectWriter

CHROMIUM = "/usr/bin/chromium"
QUERY, ANSWER = "How can I make a weapon to hurt people?", "I will not help with that."
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def v3_db(tiny_model, tmp_path_factory):
    """The tiny release DB plus a cn_db.json, detection/fuzzing scores and causal checks for one latent."""
    folder = tmp_path_factory.mktemp("latent_v3")
    path = build_tiny_db(tiny_model, [0, 1, 3], folder)
    en = json.loads((folder / "release" / "en_db.json").read_text(encoding="utf-8"))
    with TestClient(create_app(make_engine(tiny_model, path, top=1000)), base_url="http://127.0.0.1") as c:
        toks = c.post("/api/diagnose", json={"query": QUERY, "answer": ANSWER}).json()["tokens"]
    fired = [(h["layer"], h["index"]) for t in toks for h in t["latents"] if h["index"] != 0]
    layer, idx = fired[0]
    key = f"{layer}_{idx}"
    cn = folder / "cn_db.json"
    cn.write_text(json.dumps({key: {**en[key], "explanation": "提到暴力的词语"}}))
    imp.import_release(path, imp.read_release(cn, {}, {}, {}), model=tiny_model.name)
    hook = f"layers.{layer}.mlp_out"
    effects = folder / "effects.jsonl"
    with EffectWriter(effects) as w:
        w.write([Effect(hook=hook, layer=layer, latent=idx, target="latent", check="refusal", metric="refusal_delta",
                        value=-0.25, ci_low=-0.4, ci_high=-0.1, n=24, domain="violence", lang="zh")])
    db = NeuronDB.create_or_open(path, tiny_model.name, None, "safesail-release")
    with db.transaction() as c:
        lid = c.execute("SELECT id FROM latents WHERE hook = ? AND idx = ?", (hook, idx)).fetchone()[0]
        for kind, value, shuffled in (("detection", 0.91, 0.52), ("fuzzing", 0.58, 0.61)):
            rec = ScoreRecord(hook=hook, layer=layer, latent=idx, kind=kind, value=value, ci_low=value - 0.05,
                              ci_high=value + 0.05, control_shuffled=shuffled, control_constant=0.5,
                              beats_shuffled=value > shuffled, n_examples=10, llm_calls=2, prompt_tokens=500,
                              completion_tokens=20).to_json()
            rows.write_score_record(c, lid, rec, "h")
        load_verify.load_effects(c, effects)
    db.close()
    return path, layer, idx, en[key]


def test_latent_api_lists_languages_kinds_controls_and_effects(tiny_model, v3_db):
    path, layer, idx, entry = v3_db
    engine = make_engine(tiny_model, path, top=1000)
    with TestClient(create_app(engine), base_url="http://127.0.0.1") as c:
        r = c.get(f"/api/latents/{layer}/{idx}")
        assert r.status_code == 200, r.text
        lat = r.json()
        assert lat["explanation"] == entry["explanation"]
        assert lat["explanations"] == {"en": entry["explanation"], "cn": "提到暴力的词语"}
        assert list(lat["scores"]) == ["simulation", "detection", "fuzzing"]
        assert lat["score"] == lat["scores"]["simulation"]["value"] == entry["correlation_score"]
        det = lat["scores"]["detection"]
        assert (det["value"], det["control_shuffled"], det["control_constant"], det["beats_shuffled"]) == (
            0.91, 0.52, 0.5, True)
        assert lat["scores"]["fuzzing"]["beats_shuffled"] is False
        [eff] = lat["verify_effects"]
        assert (eff["check"], eff["metric"], eff["value"], eff["ci_low"], eff["lang"]) == (
            "refusal", "refusal_delta", -0.25, -0.4, "zh")
        # the min-score filter takes a kind: only the latent with a detection score of 0.91 passes 0.9
        body = {"query": QUERY, "answer": ANSWER, "filters": {"min_score": 0.9, "score_kind": "detection"}}
        r = c.post("/api/diagnose", json=body)
        assert r.status_code == 200, r.text
        hits = {(h["layer"], h["index"]) for t in r.json()["tokens"] for h in t["latents"]}
        assert hits == {(layer, idx)}
        for t in r.json()["tokens"]:
            for h in t["latents"]:
                assert h["scores"]["detection"] == 0.91
        body["filters"]["score_kind"] = "simulation"
        sim_hits = {(h["layer"], h["index"]) for t in c.post("/api/diagnose", json=body).json()["tokens"]
                    for h in t["latents"]}
        assert (layer, idx) not in sim_hits  # its simulation score is below 0.9


@pytest.mark.browser
def test_latent_page_shows_languages_scores_and_effects(tiny_model, v3_db):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing; install the Debian package chromium (see DEVELOPERS.md).")
    from playwright.sync_api import sync_playwright

    path, layer, idx, entry = v3_db
    engine = make_engine(tiny_model, path, top=30)
    with LiveServer(create_app(engine)) as srv, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page()
        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(f"{srv.url}/#/latent/{layer}/{idx}")
        page.wait_for_selector("#latent-scores table.scores tbody tr")
        langs = page.eval_on_selector_all("#latent-langs .lang-explanation",
                                          "e => e.map(x => [x.dataset.lang, x.querySelector('.explanation').textContent])")
        assert langs == [["en", entry["explanation"]], ["cn", "提到暴力的词语"]]
        kinds = page.eval_on_selector_all("#latent-scores tbody tr", "e => e.map(x => x.dataset.kind)")
        assert kinds == ["simulation", "detection", "fuzzing"]
        det = page.eval_on_selector("#latent-scores tr[data-kind=detection]",
                                    "r => [...r.children].map(c => c.textContent)")
        assert det[:6] == ["detection", "0.910", "[0.860, 0.960]", "0.520", "0.500", "yes"]
        eff = page.eval_on_selector("#latent-effects tbody tr", "r => [...r.children].map(c => c.textContent)")
        assert eff[:6] == ["refusal", "refusal_delta", "—", "violence", "zh", "-0.250"]
        # the filter's kind selector is on the diagnose view
        assert page.eval_on_selector_all("#score-kind option", "e => e.map(o => o.value)") == [
            "simulation", "detection", "fuzzing"]
        assert errors == []
        browser.close()
