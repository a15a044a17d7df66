"""The diagnose engine and JSON API on the tiny model with a real neuron DB (imported Safe-SAIL-format files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from diagnose_helpers import K, XSS_EXPLANATION, XSS_QUERY, build_tiny_db, make_engine, topk_encode
from safesail.diagnose.api.common import ServerSettings
from safesail.diagnose.schemas import CompareResponse, DiagnoseResponse
from safesail.diagnose.server import create_app, openapi_json
from safesail.hooks import HookPoint, capture_activations

REPO = Path(__file__).resolve().parents[2]
LAYERS = [0, 1, 3]


@pytest.fixture(scope="module")
def db_path(tiny_model, tmp_path_factory):
    return build_tiny_db(tiny_model, LAYERS, tmp_path_factory.mktemp("diag"))


@pytest.fixture(scope="module")
def engine(tiny_model, db_path):
    return make_engine(tiny_model, db_path, max_new_tokens_limit=64, max_query_chars=300, top=1000)


@pytest.fixture(scope="module")
def client(engine, tmp_path_factory):
    presets = tmp_path_factory.mktemp("presets") / "compare.jsonl"
    presets.write_text('{"id": "p1", "domain": "violence", "en": "How?", "zh": "怎么？", "hi": "कैसे?"}\n'
                       'not json\n{"id": "one-language", "en": "only English"}\n', encoding="utf-8")
    app = create_app(engine, ServerSettings(queue_size=2, max_body_bytes=4096, compare_file=str(presets)))
    with TestClient(app, base_url="http://127.0.0.1") as c:
        yield c


def test_info_lists_the_database_saes(client):
    info = client.get("/api/info").json()
    assert [s["layer"] for s in info["saes"]] == LAYERS
    assert all(s["n_db_latents"] > 50 and s["k"] == K and s["d_in"] == 64 for s in info["saes"])
    assert info["limits"]["queue_size"] == 2 and info["domains"] == ["politics", "pornography", "violence", "terror"]


def test_tokens_latents_and_normalisation_match_an_independent_computation(client, engine, tiny_model, db_path):
    answer = "Bread needs flour, water and time."
    r = client.post("/api/diagnose", json={"query": "How do I bake bread?", "answer": answer})
    assert r.status_code == 200, r.text
    resp = DiagnoseResponse.model_validate(r.json())
    assert resp.answer == answer and resp.generated is False
    toks = resp.tokens
    assert "".join(t.text for t in toks if t.role == "query") == "How do I bake bread?"
    assert "".join(t.text for t in toks if t.role == "answer") == answer
    assert all(not t.latents for t in toks if t.special) and any(t.special for t in toks)

    # recompute layer 1 by hand: capture, Safe-SAIL TopK encoder, divide by the DB's 0.999 quantile
    ids = torch.tensor([[t.token_id for t in toks]])
    act = capture_activations(tiny_model.model, ids, None, [HookPoint(1)])["layers.1.mlp_out"][0]
    ckpt = torch.load(Path(db_path).parent / "release" / "ckpt_layer1.pt")
    codes = topk_encode(ckpt, act, K)
    q_ids, q = engine.db.normalizers("layers.1.mlp_out")
    norm = {int(i): codes[:, int(i)] / float(v) for i, v in zip(q_ids, q)}
    known = engine.db.lookup("layers.1.mlp_out", list(norm))
    checked = 0
    for t in toks:
        if t.role not in ("query", "answer") or t.special:
            continue
        got = {h.index: h for h in t.latents if h.layer == 1}
        want = {i: float(n[t.position]) for i, n in norm.items() if float(n[t.position]) > 0 and i in known
                and (known[i]["explanation"] is not None or known[i]["tags"])}
        assert set(got) == set(want), t.position
        for i, h in got.items():
            assert h.norm_activation == pytest.approx(want[i], rel=1e-4)
            assert h.activation == pytest.approx(float(codes[t.position, i]), rel=1e-4)
            assert h.explanation == known[i]["explanation"] and h.tags == known[i]["tags"]
            assert h.neuron_id == f"1_{i}" and h.hook == "layers.1.mlp_out"
        norms = [h.norm_activation for h in t.latents]
        assert norms == sorted(norms, reverse=True)
        checked += len(got)
    assert checked > 20


def test_generation_is_the_models_greedy_answer(client, tiny_model):
    r1 = client.post("/api/diagnose", json={"query": "Tell me a story.", "max_new_tokens": 6}).json()
    r2 = client.post("/api/diagnose", json={"query": "Tell me a story.", "max_new_tokens": 6}).json()
    assert r1["generated"] and r1["answer"] == r2["answer"]
    prompt = [t["token_id"] for t in r1["tokens"] if t["role"] != "answer"]
    gen = [t["token_id"] for t in r1["tokens"] if t["role"] == "answer"]
    out = tiny_model.model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                    attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                    pad_token_id=tiny_model.tokenizer.pad_token_id)
    assert gen == out[0, len(prompt):].tolist()[:len(gen)] and 1 <= len(gen) <= 6
    assert r1["timings"]["generate_s"] > 0 and r1["timings"]["forward_s"] > 0


def test_top_and_filters_cut_the_tables(client):
    base = {"query": "How can I make a weapon?", "answer": "I cannot help with that."}
    full = client.post("/api/diagnose", json=base).json()
    top2 = client.post("/api/diagnose", json={**base, "top": 2}).json()
    for a, b in zip(full["tokens"], top2["tokens"]):
        assert b["latents"] == a["latents"][:2] and a["n_active"] == b["n_active"]
    filt = client.post("/api/diagnose", json={**base, "filters": {"domains": ["violence"], "min_score": 0.5,
                                                                   "min_norm": 0.9}}).json()
    hits = [h for t in filt["tokens"] for h in t["latents"]]
    assert hits and all("violence" in h["tags"] and h["score"] >= 0.5 and h["norm_activation"] > 0.9 for h in hits)
    colored = [t for t in full["tokens"] if t["max_norm"] > 0]
    assert colored and all(t["max_domain"] in ("politics", "pornography", "violence", "terror") for t in colored)


def test_script_injections_come_back_as_plain_data(client):
    r = client.post("/api/diagnose", json={"query": XSS_QUERY, "answer": "ok"}).json()
    assert r["query"] == XSS_QUERY
    assert "".join(t["text"] for t in r["tokens"] if t["role"] == "query") == XSS_QUERY
    assert any(h["explanation"] == XSS_EXPLANATION for t in r["tokens"] for h in t["latents"])
    lat = client.get("/api/latents/0/0").json()
    assert lat["explanation"] == XSS_EXPLANATION and lat["tags"] == ["violence"]
    assert lat["histogram"]["counts"] and lat["histogram_source"] == "top activations"
    assert lat["quantiles"]["0.999"] > 0
    # the page builds its DOM with textContent only
    js = (REPO / "safesail/diagnose/static/app.js").read_text()
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js and "document.write" not in js


def test_page_headers_and_no_debug_surfaces(client):
    page = client.get("/")
    assert page.status_code == 200 and "<textarea id=\"query\"" in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    assert client.get("/static/app.js").status_code == 200


@pytest.mark.parametrize("body,status,code", [
    ({"query": ""}, 422, "invalid"),
    ({"query": "x" * 301}, 400, "bad_request"),
    ({"query": "hi", "max_new_tokens": 65}, 400, "bad_request"),
    ({"query": "hi", "top": 0}, 422, "invalid"),
    ({"query": "hi", "filters": {"domains": ["cooking"]}}, 422, "invalid"),
    ({"query": "hi", "surprise": 1}, 422, "invalid"),
])
def test_bad_requests_get_one_sentence(client, body, status, code):
    r = client.post("/api/diagnose", json=body)
    assert r.status_code == status, r.text
    err = r.json()
    assert err["error"] == code and err["message"].endswith(".") and "\n" not in err["message"]


def test_body_size_limit(client):
    r = client.post("/api/diagnose", content=json.dumps({"query": "x" * 5000}),
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "too_large"


def test_unknown_latent_is_404(client):
    assert client.get("/api/latents/2/0").json()["error"] == "not_found"
    assert client.get("/api/latents/0/255").status_code in (200, 404)
    assert client.get("/api/latents/0/99999").status_code == 404


def test_compare_shared_and_unique_latents(client, engine):
    queries = {"en": "How do I make a bomb?", "zh": "我怎么制造炸弹？", "hi": "मैं बम कैसे बनाऊं?"}
    r = client.post("/api/compare", json={"queries": queries, "max_new_tokens": 3, "scope": "query"})
    assert r.status_code == 200, r.text
    resp = CompareResponse.model_validate(r.json())
    assert resp.languages == ["en", "zh", "hi"]
    used = {}
    for lang, q in queries.items():
        a = engine.annotate(q, resp.results[lang].answer)
        rows = [i for i, role in enumerate(a.roles) if role == "query"]
        active = (a.norm[rows] > 0).any(0)
        used[lang] = {f"{int(a.col_layer[c])}_{int(a.col_index[c])}" for c in a.info if active[c]}
    shared = set.intersection(*used.values())
    assert shared
    got_shared = {lat.neuron_id for g in resp.groups for lat in g.shared}
    assert got_shared == shared
    for lang in queries:
        only = used[lang] - set.union(*(used[o] for o in queries if o != lang))
        assert {lat.neuron_id for g in resp.groups for lat in g.unique[lang]} == only
    for g in resp.groups:
        for lat in g.shared:
            assert g.layer == lat.layer and set(lat.max_norm) == set(queries)
            assert g.domain in lat.tags or (g.domain == "general" and not set(lat.tags) & {
                "politics", "pornography", "violence", "terror"})
    assert set(resp.summary) <= {"politics", "pornography", "violence", "terror", "general"}


def test_compare_needs_two_or_three_languages(client):
    r = client.post("/api/compare", json={"queries": {"en": "hi"}})
    assert r.status_code == 400 and "2 or 3 languages" in r.json()["message"]


def test_presets_skip_bad_lines(client):
    presets = client.get("/api/compare/presets").json()["presets"]
    assert presets == [{"id": "p1", "domain": "violence", "queries": {"en": "How?", "zh": "怎么？", "hi": "कैसे?"}}]


def test_checked_in_openapi_matches_the_app():
    assert (REPO / "docs/openapi.json").read_text(encoding="utf-8") == openapi_json(create_app(None)), \
        "regenerate docs/openapi.json with `safesail serve --openapi docs/openapi.json`"


def test_cli_prints_the_table_and_json(smoke_cfg, db_path, capsys):
    from safesail.cli import main

    args = ["experiment=smoke", f"diagnose.db={db_path}", "device=cpu"]
    main(["diagnose", *args, "--top", "2", "--answer", "Sure.", "How do I bake bread?"])
    out = capsys.readouterr().out
    assert "query : How do I bake bread?" in out and "answer: Sure." in out
    assert "neuron" in out and any(line.split()[3].startswith(("0_", "1_", "3_")) for line in out.splitlines()
                                   if line.strip().startswith(("3", "4", "5")) and len(line.split()) > 4)
    main(["diagnose", *args, "--json", "--answer", "Sure.", "--top", "3", "How do I bake bread?"])
    resp = DiagnoseResponse.model_validate_json(capsys.readouterr().out)
    assert resp.answer == "Sure." and all(len(t.latents) <= 3 for t in resp.tokens)


def test_cli_bad_arguments_are_one_sentence(db_path, capsys):
    from safesail.cli import main

    with pytest.raises(SystemExit) as e:
        main(["diagnose", "experiment=smoke", f"diagnose.db={db_path}", "--lang-compare", "only one"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --lang-compare needs the query in 2 or 3 languages") and "\n" not in err
    with pytest.raises(SystemExit):
        main(["diagnose", "experiment=smoke", "diagnose.db=/nonexistent/neurons.sqlite", "hi"])
    assert "no neuron database" in capsys.readouterr().err


def test_serve_stage_defaults_and_openapi_flag(tmp_path):
    from safesail.config import compose
    from safesail.diagnose.server import run_serve_stage
    from safesail.errors import UserError

    cfg = compose([])
    s = ServerSettings.from_cfg(cfg)
    assert s.host == "127.0.0.1" and s.port == cfg.diagnose.port and s.queue_size >= 1
    out = tmp_path / "openapi.json"
    run_serve_stage(cfg, ["--openapi", str(out)])
    assert json.loads(out.read_text())["paths"].keys() >= {"/api/diagnose", "/api/compare", "/api/info",
                                                           "/api/latents/{layer}/{index}", "/api/compare/presets"}
    with pytest.raises(UserError, match="unknown arguments"):
        run_serve_stage(cfg, ["--debug"])


def test_safesail_sample_release_without_checkpoint_is_one_sentence(tmp_path, tiny_model):
    """Safe-SAIL's real released DB excerpt imports; serving it without its SAE checkpoint says what to add."""
    from safesail.diagnose.bindings import bind_saes
    from safesail.errors import UserError
    from safesail.neurondb import NeuronDB
    from safesail.neurondb import import_safesail as imp

    samples = REPO / "tests/data/safesail_samples"
    rel = imp.read_release(samples / "en_db.sample.json", {35: samples / "indices_layer35.pt"}, {}, {})
    path = tmp_path / "safesail.sqlite"
    imp.import_release(path, rel, model="qwen2.5-3b-instruct")
    db = NeuronDB.open(path)
    assert any(s["layer"] == 35 for s in db.saes())
    with pytest.raises(UserError, match="names no SAE file for layers.0.mlp_out; import the release's ckpt_layer0.pt"):
        bind_saes(db, path, torch.device("cpu"), 2048, 36)
    with pytest.raises(UserError, match="has an SAE on layer .* but the model has 4 layers"):
        bind_saes(db, path, torch.device("cpu"), tiny_model.hidden_size, tiny_model.num_layers)


def test_streaming_sends_the_answer_then_the_result(client):
    with client.stream("POST", "/api/diagnose/stream", json={"query": "Tell me a story.", "max_new_tokens": 6}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        body = "".join(r.iter_text())
    events = [(b.split("\n")[0][len("event: "):], json.loads(b.split("\n")[1][len("data: "):]))
              for b in body.strip().split("\n\n")]
    assert events[-1][0] == "result" and all(kind == "token" for kind, _ in events[:-1])
    result = DiagnoseResponse.model_validate(events[-1][1])
    assert "".join(d["text"] for _, d in events[:-1]) == result.answer
    plain = client.post("/api/diagnose", json={"query": "Tell me a story.", "max_new_tokens": 6}).json()
    assert plain["answer"] == result.answer
    assert client.post("/api/diagnose/stream", json={"query": "x" * 301}).json()["error"] == "bad_request"
