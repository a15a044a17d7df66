"""The explain stage against a real local HTTP server that injects faults (issue 16, item 5).

Transport faults (a 200 with a cut JSON body, empty content, 5xx, a dropped connection) are retried
with backoff during the run, and the latents they still failed are asked again after a restart with
a healthy server. A reply that parses but says nothing usable stays a named failure that a re-run
asks once more (past the response cache), and then leaves alone.
"""

from __future__ import annotations

import json


from llm_fault_server import FaultServer
from safesail.interpret.explain import run_explain_stage
from collect_helpers import make_collected_run

GOOD = "mentions of rivers and water"
N_EXPLAINABLE = 7  # latent 0 of the stand-in SAE never fires: too_few_examples, no LLM call


def _cfg(smoke_cfg, server: FaultServer, *extra: str):
    return smoke_cfg("llm=openai", f"llm.base_url={server.base_url}", "llm.model=fault-test-model",
                     "llm.api_key_env=null", "llm.backoff_base_s=0.01", "llm.backoff_max_s=0.02", "llm.timeout_s=10",
                     "explain.language=en", *extra)


def _last(rd) -> dict[int, dict]:
    out = {}
    for line in (rd.interpret / "explanations.jsonl").read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            out[rec["latent"]] = rec
    return out


def test_thirty_percent_transport_faults_are_retried_during_the_run(smoke_cfg, tiny_model):
    # A cut body and empty content first, then 30% of the answers faulty (a random mix of all five).
    with FaultServer(reply=lambda body: GOOD, plan=["truncated", "empty"], fault_rate=0.3, seed=3) as server:
        cfg = _cfg(smoke_cfg, server, "llm.max_retries=6")
        rd = make_collected_run(cfg, tiny_model)
        run_explain_stage(cfg, [])
    recs = _last(rd)
    assert sum(r["status"] == "ok" for r in recs.values()) == N_EXPLAINABLE
    faults = [s for s in server.sent if s != "ok"]
    assert {"truncated", "empty"} <= set(faults) and len(faults) >= 3, server.sent
    assert rd.stage_record("explain")["status"] == "done"


def test_transport_failures_left_by_a_run_are_retried_after_a_restart(smoke_cfg, tiny_model):
    # One at a time, one retry: the first two latents see a cut body twice, the next two empty content twice.
    plan = ["truncated", "truncated", "empty", "empty", "html", "html"]
    with FaultServer(reply=lambda body: GOOD, plan=plan) as server:
        cfg = _cfg(smoke_cfg, server, "llm.max_retries=1", "explain.concurrency=1")
        rd = make_collected_run(cfg, tiny_model)
        run_explain_stage(cfg, [])
        first = _last(rd)
        reasons = sorted(r["reason"] for r in first.values() if r["status"] != "ok" and r["latent"] != 0)
        assert reasons == ["empty_reply", "truncated_reply", "truncated_reply"]
        assert rd.stage_record("explain")["status"] == "partial"
        before = len(server.requests)
        run_explain_stage(cfg, [])  # the restart: the server is healthy now
        assert len(server.requests) - before == 3  # only the three failed latents are asked again
    assert sum(r["status"] == "ok" for r in _last(rd).values()) == N_EXPLAINABLE
    assert rd.stage_record("explain")["status"] == "done"


def test_a_useless_reply_is_named_and_asked_again_once(smoke_cfg, tiny_model):
    useless = {"n": 0}

    def reply(body):  # the first latent's first two answers have no words; everything else is fine
        useless["n"] += 1
        return "12 34 !!" if useless["n"] in (1, len_first + 1) else GOOD

    len_first = N_EXPLAINABLE
    with FaultServer(reply=reply) as server:
        cfg = _cfg(smoke_cfg, server, "explain.concurrency=1")
        rd = make_collected_run(cfg, tiny_model)
        run_explain_stage(cfg, [])
        bad = [r for r in _last(rd).values() if r["status"] != "ok" and r["latent"] != 0]
        assert [(r["reason"], r["attempt"]) for r in bad] == [("malformed_reply", 0)]
        assert rd.stage_record("explain")["status"] == "partial"
        run_explain_stage(cfg, [])  # asked once more, past the response cache: the same useless answer
        assert len(server.requests) == N_EXPLAINABLE + 1
        again = _last(rd)[bad[0]["latent"]]
        assert (again["reason"], again["attempt"], again["cached"]) == ("malformed_reply", 1, False)
        assert rd.stage_record("explain")["status"] == "done"
        run_explain_stage(cfg, [])  # then it stays a named failure
        assert len(server.requests) == N_EXPLAINABLE + 1
