"""One model shared by concurrent HTTP clients: all answered correctly; past the queue bound a clear 503."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from diagnose_helpers import LiveServer, build_tiny_db, make_engine
from safesail.diagnose.api.common import ServerSettings
from safesail.diagnose.gate import Busy, ModelGate
from safesail.diagnose.server import create_app

QUERIES = ["How do I bake bread?", "What is the capital of France?", "Tell me a story about a dragon.",
           "请解释一下光合作用。", "भारत की राजधानी क्या है?", "Write a poem about the sea."]


@pytest.fixture(scope="module")
def engine(tiny_model, tmp_path_factory):
    return make_engine(tiny_model, build_tiny_db(tiny_model, [0, 1, 3], tmp_path_factory.mktemp("conc")),
                       max_new_tokens_limit=256, top=5)


def test_gate_bounds_the_queue():
    gate = ModelGate(2)
    held, release = threading.Event(), threading.Event()

    def holder():
        with gate.slot():
            held.set()
            release.wait(5)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(5)
    with pytest.raises(Busy, match="waited"):
        with gate.slot(0.05):
            pass
    assert gate.pending == 1
    release.set()
    t.join()
    with gate.slot(0.1) as waited:
        assert waited < 0.1 and gate.pending == 1
    assert gate.pending == 0


def test_concurrent_clients_all_get_their_own_correct_answer(engine):
    expected = {q: engine.diagnose(q, max_new_tokens=6) for q in QUERIES}
    app = create_app(engine, ServerSettings(queue_size=len(QUERIES)))
    with LiveServer(app) as srv:
        def ask(q):
            return httpx.post(srv.url + "/api/diagnose", json={"query": q, "max_new_tokens": 6, "top": 5}, timeout=120)

        with ThreadPoolExecutor(len(QUERIES)) as ex:
            answers = list(ex.map(ask, QUERIES))
    for q, r in zip(QUERIES, answers):
        assert r.status_code == 200, r.text
        body = r.json()
        want = expected[q]
        assert body["query"] == q and body["answer"] == want.answer
        assert [t["token_id"] for t in body["tokens"]] == [t.token_id for t in want.tokens]
        for got_t, want_t in zip(body["tokens"], want.tokens):
            assert [h["neuron_id"] for h in got_t["latents"]] == [h.neuron_id for h in want_t.latents]
    assert max(r.json()["timings"]["queue_s"] for r in answers) > 0  # some of them really waited their turn


def test_past_the_queue_bound_the_answer_is_busy(engine):
    app = create_app(engine, ServerSettings(queue_size=2, request_timeout_s=60))
    with LiveServer(app) as srv:
        queued = {}
        with app.state.gate.slot():  # a request is running on the model
            t = threading.Thread(target=lambda: queued.setdefault("r", httpx.post(
                srv.url + "/api/diagnose", json={"query": "I wait in the queue", "max_new_tokens": 4}, timeout=120)))
            t.start()
            deadline = time.time() + 30
            while app.state.gate.pending < 2 and time.time() < deadline:
                time.sleep(0.005)
            t0 = time.time()
            r = httpx.post(srv.url + "/api/diagnose", json={"query": "me too"}, timeout=30)
            refused_in = time.time() - t0
        t.join(120)
    assert r.status_code == 503 and refused_in < 2
    assert r.json()["error"] == "busy" and "try again" in r.json()["message"]
    assert queued["r"].status_code == 200 and queued["r"].json()["timings"]["queue_s"] > 0


def test_waiting_past_the_request_timeout_is_busy(engine):
    app = create_app(engine, ServerSettings(queue_size=3, request_timeout_s=0.3))
    with LiveServer(app) as srv:
        with app.state.gate.slot():  # someone holds the model
            t0 = time.time()
            r = httpx.post(srv.url + "/api/diagnose", json={"query": "hello"}, timeout=30)
            waited = time.time() - t0
    assert r.status_code == 503 and "waited" in r.json()["message"] and 0.25 < waited < 5
