"""POST /api/steer, its stream and `safesail diagnose --ablate/--add` on the tiny model with a real neuron DB."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from diagnose_helpers import build_tiny_db, make_engine
from safesail.diagnose.api.common import ServerSettings
from safesail.diagnose.server import create_app
from safesail.diagnose.steer import SteerResponse

LAYERS = [0, 1, 3]
QUERY = "Tell me a story about a dragon."


@pytest.fixture(scope="module")
def db_path(tiny_model, tmp_path_factory):
    return build_tiny_db(tiny_model, LAYERS, tmp_path_factory.mktemp("steer"))


@pytest.fixture(scope="module")
def engine(tiny_model, db_path):
    return make_engine(tiny_model, db_path, max_new_tokens_limit=64, max_query_chars=300)


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(engine, ServerSettings(queue_size=2)), base_url="http://127.0.0.1") as c:
        yield c


def _db_latent(engine, layer: int) -> str:
    b = next(b for b in engine.saes if b.layer == layer)
    return f"{layer}_{int(b.latent_ids[1])}"


def test_steer_gives_both_answers_and_ablating_an_inactive_latent_changes_nothing(client, engine):
    plain = client.post("/api/diagnose", json={"query": QUERY, "max_new_tokens": 8}).json()
    lid = _db_latent(engine, 1)
    r = client.post("/api/steer", json={"query": QUERY, "max_new_tokens": 8,
                                        "edits": [{"neuron_id": lid, "mode": "add", "strength": 60}]})
    assert r.status_code == 200, r.text
    resp = SteerResponse.model_validate(r.json())
    assert resp.original.result.answer == plain["answer"]
    assert resp.steered.result.answer != resp.original.result.answer
    assert resp.original.refusal.lang == "en" and resp.steered.refusal.logprob < 0
    # the same edit again: the original side comes from the cache
    again = SteerResponse.model_validate(client.post("/api/steer", json={
        "query": QUERY, "max_new_tokens": 8, "edits": [{"neuron_id": lid, "mode": "add", "strength": 60}]}).json())
    assert again.original.cached and again.steered.result.answer == resp.steered.result.answer
    zero = SteerResponse.model_validate(client.post("/api/steer", json={
        "query": QUERY, "max_new_tokens": 8, "edits": [{"neuron_id": lid, "mode": "add", "strength": 0}]}).json())
    assert zero.steered.result.answer == zero.original.result.answer
    # both sides are read in one batched forward, so values may differ in the last bits (GEMM row blocking)
    for ts, to in zip(zero.steered.result.tokens, zero.original.result.tokens, strict=True):
        assert (ts.token_id, ts.role, [x.neuron_id for x in ts.latents]) == \
            (to.token_id, to.role, [x.neuron_id for x in to.latents])
        assert [x.norm_activation for x in ts.latents] == pytest.approx([x.norm_activation for x in to.latents],
                                                                       rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("edit, words", [
    ({"neuron_id": "1-5", "mode": "ablate"}, "not of the form"),
    ({"neuron_id": "2_5", "mode": "ablate"}, "no SAE on layer 2"),
    ({"neuron_id": "1_99999", "mode": "ablate"}, "does not exist"),
    ({"neuron_id": "LATENT", "mode": "add", "strength": 1000}, "out of range"),
    ({"neuron_id": "LATENT", "mode": "clamp", "strength": -2}, "never negative"),
])
def test_bad_edits_are_400_with_one_sentence(client, engine, edit, words):
    edit = dict(edit, neuron_id=edit["neuron_id"].replace("LATENT", _db_latent(engine, 1)))
    for path in ("/api/steer", "/api/steer/stream"):
        r = client.post(path, json={"query": QUERY, "edits": [edit]})
        assert r.status_code == 400, r.text
        body = r.json()
        assert body["error"] == "bad_request" and words in body["message"] and body["message"].endswith(".")
    r = client.post("/api/steer", json={"query": QUERY, "edits": [{"neuron_id": "1_1", "mode": "boost"}]})
    assert r.status_code == 422 and r.json()["message"].startswith("edits.0.mode")


def test_steer_stream_sends_both_sides_then_the_result(client, engine):
    lid = _db_latent(engine, 3)
    body = {"query": "How do I bake bread at home?", "max_new_tokens": 6,
            "edits": [{"neuron_id": lid, "mode": "add", "strength": 40}, {"neuron_id": lid, "mode": "ablate"}]}
    with client.stream("POST", "/api/steer/stream", json=body) as r:
        assert r.status_code == 200
        text = "".join(r.iter_text())
    events = [(b.split("\n")[0][len("event: "):], json.loads(b.split("\n")[1][len("data: "):]))
              for b in text.strip().split("\n\n")]
    assert events[-1][0] == "result"
    resp = SteerResponse.model_validate(events[-1][1])
    for side in ("original", "steered"):
        got = "".join(d["text"] for k, d in events[:-1] if d["side"] == side)
        assert got == getattr(resp, side).result.answer


def test_cli_ablate_and_add(db_path, capsys, engine):
    from safesail.cli import main

    lid = _db_latent(engine, 1)
    args = ["diagnose", "experiment=smoke", f"diagnose.db={db_path}", "device=cpu", "--max-new-tokens", "6"]
    main([*args, "--ablate", lid, "--add", f"{lid}=30", QUERY])
    out = capsys.readouterr().out
    assert f"interventions: {lid} ablate, {lid} add=30" in out
    assert "=== original: refusal log-prob" in out and "=== steered: refusal log-prob" in out
    main([*args, "--json", "--add", f"{lid}=30", QUERY])
    resp = SteerResponse.model_validate_json(capsys.readouterr().out)
    assert resp.edits[0].strength == 30
    with pytest.raises(SystemExit) as e:
        main([*args, "--add", lid, QUERY])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --add needs a strength") and "\n" not in err


def test_batched_annotation_equals_one_answer_at_a_time(engine):
    """annotate_answers: one right-padded forward for several answers (row r under its own edit)
    gives each answer the same per-token latents as annotating it alone."""
    import torch

    from safesail.diagnose.steer import SteerEdit, intervention_for, to_edits

    answers = ["Once upon a time a dragon slept.", "No.", ""]
    batched = engine.annotate_answers(QUERY, answers)
    for a, ans in zip(batched, answers):
        alone = engine.annotate(QUERY, ans)
        assert a.ids == alone.ids and a.roles == alone.roles
        assert torch.allclose(a.norm, alone.norm, atol=1e-5) and sorted(a.info) == sorted(alone.info)
    # the edit on the second row only: row 0 is unmodified, row 1 equals annotating under the edit
    iv = intervention_for(engine, to_edits([SteerEdit(neuron_id=_db_latent(engine, 1), mode="add", strength=60)]))
    rows = [False, True]
    two = engine.annotate_answers(QUERY, answers[:2], edits=lambda model, n: iv.apply(model, rows=rows))
    with iv.apply(engine.lm.model):
        edited = engine.annotate(QUERY, answers[1])
    assert torch.allclose(two[0].norm, batched[0].norm, atol=1e-5)
    assert torch.allclose(two[1].norm, edited.norm, atol=1e-5)
    assert not torch.allclose(two[1].norm, batched[1].norm, atol=1e-3)


def test_cold_steer_reads_both_refusal_scores_from_its_one_generation(engine):
    """The original and the steered answer come from ONE generate call of two rows (edits on the second),
    and their refusal scores from that generation's cache: equal to generating each alone and scoring the
    refusal openings in a separate pass."""
    import torch

    from safesail.diagnose.steer import SteerRequest, _generate_rows, intervention_for, to_edits
    from safesail.verify.refusal import refusal_logprob

    lid = _db_latent(engine, 1)
    req = SteerRequest(query=QUERY, max_new_tokens=8, edits=[{"neuron_id": lid, "mode": "add", "strength": 60}])
    iv = intervention_for(engine, to_edits(req.edits))
    both = _generate_rows(engine, req, iv, [False, True], None, None)
    steered = _generate_rows(engine, req, iv, [True], None, None)
    plain = engine.diagnose(QUERY, max_new_tokens=8).answer
    assert both.answers[0][0] == plain and both.answers[1] == steered.answers[0]
    assert both.answers[0] != both.answers[1]
    prompt, _ = engine._prompt(QUERY)
    want = refusal_logprob(engine.lm, [prompt, prompt], ["en", "en"], batch_size=2, ivs=[None, iv])
    assert both.refusal == pytest.approx(want, abs=1e-4)
    assert both.refusal[1] == pytest.approx(steered.refusal[0], abs=1e-4)
    assert abs(both.refusal[0] - both.refusal[1]) > 1e-3          # the edit moved the steered row's refusal score
    assert torch.isfinite(torch.tensor(both.refusal)).all()


@pytest.mark.parametrize("new_tokens", [8, 64])
def test_steer_latents_read_from_the_generation_equal_a_separate_pass(engine, new_tokens):
    """Each side's per-token latents come from the activations its generation computed (the last token
    by one more step): equal to annotating the same ids again in a separate pass, under the edits."""
    from safesail.diagnose.steer import SteerRequest, _annotated_sides, _generate_rows, intervention_for, to_edits

    lid = _db_latent(engine, 1)
    req = SteerRequest(query=QUERY, max_new_tokens=new_tokens,
                       edits=[{"neuron_id": lid, "mode": "add", "strength": 60}])
    iv = intervention_for(engine, to_edits(req.edits))
    gen = _generate_rows(engine, req, iv, [False, True], None, None)
    sides = _annotated_sides(engine, req, gen)
    again = engine.annotate_answers(QUERY, [text for text, _, _ in gen.answers],
                                    edits=lambda model, n: iv.apply(model, rows=[False, True]))
    for side, a, (text, truncated, ids) in zip(sides, again, gen.answers):
        assert side.result.answer == text and side.result.truncated == truncated
        want = engine.response(a, req.top, req.filters)
        assert [t.token_id for t in side.result.tokens] == a.ids == gen.prompt + ids
        for ts, tw in zip(side.result.tokens, want.tokens, strict=True):
            assert [x.neuron_id for x in ts.latents] == [x.neuron_id for x in tw.latents]
            assert [x.norm_activation for x in ts.latents] == pytest.approx(
                [x.norm_activation for x in tw.latents], rel=1e-4, abs=1e-5)
    assert any(not t for _, t, _ in gen.answers) or new_tokens == 8   # 64 tokens: some answer ended itself
