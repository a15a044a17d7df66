"""The explain stage: prompt, parsing, fault recording, trimming, resume after a kill, the cache."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from safesail.interpret.clients.base import ChatRequest, Completion, LLMClient, LLMError
from safesail.interpret.clients.cache import CachedClient
from safesail.interpret.explain import run_explain_stage
from safesail.interpret.prompts.explain import (EXAMPLES, N_SHOWN, PROMPT_VERSION, ExplanationError,
                                                build_explain_messages, copied_reason, example_tokens,
                                                parse_explanation, scale_acts)
from safesail.rundir import RunDir

from collect_helpers import make_collected_run

HOOK = "layers.1.mlp_out"


class ScriptedLLM(LLMClient):
    """A test double of a back end: answers calls in order from a list (text or LLMError)."""

    def __init__(self, replies, context_window=4096, kill_at: int | None = None):
        self.replies = list(replies)
        self.model_name = "scripted"
        self.context_window = context_window
        self.kill_at = kill_at
        self.calls: list[ChatRequest] = []

    def count_tokens(self, text: str) -> int:
        return len(text) // 4 + 1

    async def chat(self, req: ChatRequest) -> Completion:
        self.calls.append(req)
        if self.kill_at is not None and len(self.calls) == self.kill_at:
            raise Killed()
        r = self.replies[(len(self.calls) - 1) % len(self.replies)]
        await asyncio.sleep(0)
        if isinstance(r, Exception):
            raise r
        return Completion(text=r, model="scripted", prompt_tokens=self.count_message_tokens(req.messages),
                          completion_tokens=3)


class Killed(BaseException):
    """Stands for the process being killed in the middle of a call."""


def _records(rd):
    path = rd.interpret / "explanations.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_prompt_shows_scaled_activations_and_parsing_cleans_replies():
    seg = {"tokens": ["The", " river", " flows", "\n"], "acts": [0.0, 4.0, 1.0, 0.0]}
    msgs = build_explain_messages([seg], max_act=4.0)
    assert [m["role"] for m in msgs] == ["system"] + ["user", "assistant"] * N_SHOWN + ["user"]
    assert 'Excerpt 1: The [river] flows⏎' in msgs[-1]["content"]
    assert '" river" (10), " flows" (3)' in msgs[-1]["content"]
    assert scale_acts([0, 0.04, 2, 8, 9], 8) == [0, 0, 3, 10, 10]
    assert parse_explanation('Explanation: The latent detects "words about rivers".\nMore text') == \
        "words about rivers"
    assert parse_explanation("  \n- This neuron fires on numbers and dates.") == "numbers and dates"
    assert len(parse_explanation("word " * 100, max_chars=40)) <= 40
    for bad, reason in [("", "empty_reply"), ("   \n ", "empty_reply"), ("12 34 !!", "malformed_reply"),
                        ("这个潜在单元检测河流", "wrong_language")]:
        with pytest.raises(ExplanationError) as e:
            parse_explanation(bad)
        assert e.value.reason == reason


def test_worked_examples_rotate_and_are_not_about_the_domains():
    seg = {"tokens": [" a", " b"], "acts": [1.0, 0.0]}
    shown = [tuple(m["content"] for m in build_explain_messages([seg], 1.0, r) if m["role"] == "assistant")
             for r in range(len(EXAMPLES))]
    assert len(set(shown)) == len(EXAMPLES) and len({a for s in shown for a in s}) == len(EXAMPLES)
    domain_words = ("polit", "porn", "sex", "violen", "terror", "kill", "weapon", "gun", "bomb", "war")
    for ex in EXAMPLES:
        text = (ex.answer + " ".join(t for t, _ in ex.excerpts)).lower()
        assert not any(w in text for w in domain_words), ex.answer
        for excerpt, active in ex.excerpts:   # every listed active token is a token of its excerpt
            assert {t for t, _ in active} <= set(example_tokens(excerpt))


@pytest.mark.parametrize("reply,copied", [
    ("colour words", True), ("Colour words.", True), ("units of measurement after numbers", True),
    ("day of the week and month", True), ("she painted the fence bright red and the door", True),
    ("the police officers searched the car for the stolen", True),     # echoes the latent's own excerpt
    ("words for police and searching", False), ("victims of violence", False), ("the word 'car'", False),
    ("colours of police cars", False),
])
def test_copied_example_detection(reply, copied):
    excerpts = [" Yesterday the police officers searched the car for the stolen goods."]
    why = copied_reason(parse_explanation(reply), excerpts)
    assert (why is not None) == copied, why


def test_a_copied_reply_is_retried_once_with_other_examples_then_named(smoke_cfg, tiny_model):
    cfg = smoke_cfg("explain.concurrency=1", "explain.latents=[2,3]")
    rd = make_collected_run(cfg, tiny_model)
    # latent 2: parrots an example, then answers; latent 3: parrots twice.
    llm = ScriptedLLM([EXAMPLES[0].answer, "rivers and streams", EXAMPLES[1].answer, EXAMPLES[2].answer])
    run_explain_stage(cfg, [], client=llm)
    recs = {r["latent"]: r for r in _records(rd)}
    assert recs[2]["status"] == "ok" and recs[2]["explanation"] == "rivers and streams"
    assert recs[2]["llm_calls"] == 2 and len(recs[2]["copied"]) == 1
    assert recs[3]["status"] == "failed" and recs[3]["reason"] == "copied_example" and recs[3]["llm_calls"] == 2
    first, retry = llm.calls[0].messages, llm.calls[1].messages
    answers = [{m["content"] for m in msgs if m["role"] == "assistant"} for msgs in (first, retry)]
    assert answers[0].isdisjoint(answers[1])        # the retry shows other worked examples
    assert first[-1] == retry[-1]                    # about the same excerpts
    # copied_example is a permanent failure: a re-run does not ask again
    llm2 = ScriptedLLM(["never asked"])
    run_explain_stage(smoke_cfg("explain.concurrency=1", "explain.latents=[2,3]", "explain.max_chars=199"), [],
                      client=llm2)
    assert llm2.calls == []


def test_faults_are_recorded_per_latent_and_counted(smoke_cfg, tiny_model):
    cfg = smoke_cfg("explain.concurrency=1", "explain.language=en")
    rd = make_collected_run(cfg, tiny_model)
    replies = ["Explanation: words about rivers.", LLMError("rate_limited", "429 after retries"),
               LLMError("server_error", "HTTP 500"), "", "这个潜在单元检测河流", LLMError("timeout", "60 s"),
               "numbers"]
    llm = ScriptedLLM(replies)
    run_explain_stage(cfg, [], client=llm)
    recs = {r["latent"]: r for r in _records(rd)}
    assert sorted(recs) == list(range(8))
    assert recs[0]["status"] == "failed" and recs[0]["reason"] == "too_few_examples"  # the dead latent
    got = [(recs[j]["status"], recs[j]["reason"]) for j in range(1, 8)]
    assert got == [("ok", None), ("failed", "rate_limited"), ("failed", "server_error"), ("failed", "empty_reply"),
                   ("failed", "wrong_language"), ("failed", "timeout"), ("ok", None)]
    assert recs[1]["explanation"] == "words about rivers" and recs[1]["raw"] == replies[0]
    assert recs[1]["model"] == "scripted" and recs[1]["prompt_version"] == PROMPT_VERSION and recs[1]["layer"] == 1
    assert recs[1]["prompt_tokens"] > 0 and recs[1]["segments"] > 0
    stage = rd.stage_record("explain")
    assert stage["status"] == "partial"
    assert stage["summary"]["ok"] == 2 and stage["summary"]["failed:rate_limited"] == 1
    assert stage["summary"]["failed:too_few_examples"] == 1
    # A re-run retries the transport failures (429, 500, empty reply, timeout) and, once, the model-level
    # one (wrong language); the too-few latent stays recorded once.
    llm2 = ScriptedLLM(["a better answer"])
    run_explain_stage(cfg, [], client=llm2)
    assert len(llm2.calls) == 5
    assert rd.stage_record("explain")["status"] == "done"
    recs = _records(rd)
    assert sum(r["latent"] == 0 for r in recs) == 1


def test_long_prompts_are_trimmed_to_the_context_window(smoke_cfg, tiny_model):
    cfg = smoke_cfg("explain.latents=[2]", "explain.max_segments=8", "explain.max_tokens=20")
    rd = make_collected_run(cfg, tiny_model)
    roomy = ScriptedLLM(["rivers"], context_window=100000)
    run_explain_stage(cfg, [], client=roomy)
    full = _records(rd)[-1]["segments"]
    assert full >= 3
    need = roomy.count_message_tokens(roomy.calls[0].messages)
    (rd.stages / "explain.json").unlink()
    (rd.interpret / "explanations.jsonl").unlink()
    tight = ScriptedLLM(["rivers"], context_window=need - 40 + 20)
    run_explain_stage(cfg, [], client=tight)
    rec = _records(rd)[-1]
    assert rec["status"] == "ok" and 1 <= rec["segments"] < full
    assert tight.count_message_tokens(tight.calls[0].messages) + 20 <= tight.context_window
    (rd.stages / "explain.json").unlink()
    (rd.interpret / "explanations.jsonl").unlink()
    tiny = ScriptedLLM(["rivers"], context_window=60)  # the instructions alone do not fit
    run_explain_stage(cfg, [], client=tiny)
    rec = _records(rd)[-1]
    assert rec["status"] == "failed" and rec["reason"] == "context_overflow" and tiny.calls == []


def test_resume_after_kill_repeats_no_llm_call(smoke_cfg, tiny_model):
    cfg = smoke_cfg("explain.concurrency=1")
    rd = make_collected_run(cfg, tiny_model)
    cache = rd.interpret / "llm_cache.sqlite"
    first = ScriptedLLM([f"answer {i}" for i in range(10)], kill_at=4)
    with pytest.raises(Killed):
        run_explain_stage(cfg, [], client=CachedClient(first, cache))
    done = {r["latent"] for r in _records(rd) if r["status"] == "ok"}
    assert len(done) == 3 and rd.stage_record("explain") is None
    second = ScriptedLLM(["later answer"])
    run_explain_stage(cfg, [], client=CachedClient(second, cache))
    assert len(second.calls) == 7 - 3  # only the latents not yet explained (latent 0 has no examples)
    assert rd.stage_record("explain")["status"] == "done"
    third = ScriptedLLM(["never used"])
    run_explain_stage(cfg, [], client=CachedClient(third, cache))
    assert third.calls == []  # finished stage: nothing to do
    # Explanations lost, cache kept: every answer comes from the cache.
    (rd.interpret / "explanations.jsonl").unlink()
    (rd.stages / "explain.json").unlink()
    fourth = ScriptedLLM(["never used"])
    client = CachedClient(fourth, cache)
    run_explain_stage(cfg, [], client=client)
    assert fourth.calls == [] and client.stats.hit_rate == 1.0 and client.stats.calls == 7
    assert all(r["cached"] for r in _records(rd) if r["status"] == "ok")


def test_server_down_is_recorded_and_the_run_finishes(smoke_cfg, tiny_model):
    cfg = smoke_cfg("llm=transformers-serve", "llm.base_url=http://127.0.0.1:9/v1", "llm.model=x",
                    "llm.max_retries=1", "llm.backoff_base_s=0.01")
    rd = make_collected_run(cfg, tiny_model)
    run_explain_stage(cfg, [])
    recs = _records(rd)
    assert len(recs) == 8
    assert {r["reason"] for r in recs if r["latent"] != 0} == {"connection"}
    assert rd.stage_record("explain")["summary"]["failed:connection"] == 7


def test_bad_input_is_a_user_error(smoke_cfg, tiny_model):
    from safesail.errors import UserError

    cfg = smoke_cfg()
    with pytest.raises(UserError, match="run `safesail collect` first"):
        run_explain_stage(cfg, [], client=ScriptedLLM(["x"]))
    make_collected_run(cfg, tiny_model)
    with pytest.raises(UserError, match="not collected"):
        run_explain_stage(smoke_cfg("explain.latents=[99]"), [], client=ScriptedLLM(["x"]))


@pytest.mark.slow
def test_explain_with_the_local_default_model(smoke_cfg, tiny_model, cache_dir):
    """The default llm=local (embedded SmolLM2-135M-Instruct), two latents, short replies."""
    from safesail.config import compose

    cfg = smoke_cfg("explain.latents=[3,5]", "explain.max_segments=2", "explain.max_tokens=12")
    cfg.llm = compose(["llm=local"]).llm  # the smoke experiment makes the tiny model its own explainer
    rd = make_collected_run(cfg, tiny_model)
    run_explain_stage(cfg, [])
    recs = _records(rd)
    assert sorted(r["latent"] for r in recs) == [3, 5]
    assert all(r["model"] == "smollm2-135m-instruct" and r["raw"] for r in recs)
    assert any(r["status"] == "ok" and r["explanation"] for r in recs)
    assert (Path(cfg.run.dir) / "interpret" / "llm_cache.sqlite").exists()


def test_the_strongest_pair_candidates_are_chosen_over_all_hooks(tmp_path):
    from safesail.interpret.explain import strongest_candidates
    from safesail.train.selection import SELECTION_VERSION, write_selection

    rd = RunDir(tmp_path / "run")
    c = lambda j, f, gap=0.0: {"latent": j, "freq": f, "mean_act_diff": gap}  # noqa: E731
    write_selection(rd.root, {"version": SELECTION_VERSION, "chosen": {}, "candidates": {
        "layers.1.mlp_out": {"violence": [c(3, 0.4), c(4, 0.1)], "terror": [c(3, 0.2)], "all": [c(9, 0.9)]},
        "layers.2.mlp_out": {"violence": [c(7, 0.3)], "terror": [c(8, 0.2, 1.0), c(5, 0.05)]}}})
    got = strongest_candidates(rd, ["layers.1.mlp_out", "layers.2.mlp_out"], 2)
    # violence: 3 (0.4) and 7 (0.3); terror: 8 (0.2, larger gap) and 3 (0.2); "all" is not a domain
    assert got == {"layers.1.mlp_out": [3], "layers.2.mlp_out": [7, 8]}
    assert strongest_candidates(rd, ["layers.2.mlp_out"], 1) == {"layers.2.mlp_out": [7, 8]}


def test_candidates_are_ranked_by_the_significance_of_their_pair_evidence(tmp_path):
    import torch

    from safesail.interpret.explain import strongest_candidates
    from safesail.train.selection import SELECTION_VERSION, pair_stats_path, save_tensors, write_selection

    rd = RunDir(tmp_path / "run")
    hook = "layers.1.mlp_out"
    # latent 0: broad (fires on 70% of concepts, 42% of twins); latent 1: specific (35% vs 3%)
    write_selection(rd.root, {"version": SELECTION_VERSION, "chosen": {}, "pairs": {"by_domain": {"terror": 100}},
                              "candidates": {hook: {"terror": [{"latent": 0, "freq": 0.30},
                                                               {"latent": 1, "freq": 0.29}]}}})
    save_tensors(pair_stats_path(rd.root, hook), {"latent_ids": torch.tensor([0, 1]),
                                                  "terror.distinguish_rate": torch.tensor([0.45, 0.32]),
                                                  "terror.reverse_rate": torch.tensor([0.15, 0.0])})
    assert strongest_candidates(rd, [hook], 1, rank="mcnemar") == {hook: [1]}
    assert strongest_candidates(rd, [hook], 1, rank="select") == {hook: [0]}   # no score recorded: by freq


def test_candidates_are_ranked_by_the_score_select_recorded(tmp_path):
    from safesail.errors import UserError
    from safesail.interpret.explain import strongest_candidates
    from safesail.train.selection import SELECTION_VERSION, write_selection

    rd = RunDir(tmp_path / "run")
    c = lambda j, f, score: {"latent": j, "freq": f, "score": score}  # noqa: E731
    # latent 2 distinguishes more pairs (freq) but latent 6 fires on the concept words themselves (score)
    write_selection(rd.root, {"version": SELECTION_VERSION, "chosen": {}, "candidates": {
        "layers.0.mlp_out": {"pornography": [c(2, 0.5, 0.1), c(6, 0.2, 0.6)]},
        "layers.7.mlp_out": {"pornography": [c(4, 0.4, 0.3)]}}})
    assert strongest_candidates(rd, ["layers.0.mlp_out", "layers.7.mlp_out"], 1) == {"layers.0.mlp_out": [6]}
    assert strongest_candidates(rd, ["layers.0.mlp_out", "layers.7.mlp_out"], 2) == \
        {"layers.0.mlp_out": [6], "layers.7.mlp_out": [4]}
    with pytest.raises(UserError, match="explain.rank"):
        strongest_candidates(rd, ["layers.0.mlp_out"], 1, rank="best")


def test_the_v3_prompt_lists_the_peak_tokens_with_counts_and_asks_about_them():
    from safesail.interpret.prompts.explain import QUESTION, QUESTION_V2, peak_summary

    segs = [{"tokens": [" terror", " attacks", " in"], "acts": [1.0, 5.0, 0.0]},
            {"tokens": [" the", " attack", "."], "acts": [0.0, 4.0, 1.0]},
            {"tokens": [" an", " attack", "\n"], "acts": [0.5, 3.0, 0.0]}]
    assert peak_summary([" attack", " attacks", " attack", "\n"]) == \
        'Peak tokens: "attack" (2), "attacks" (1), "⏎" (1)'
    msgs = build_explain_messages(segs, 5.0, rotation=0)
    last = msgs[-1]["content"]
    assert last.endswith('Peak tokens: "attack" (2), "attacks" (1)\n\n' + QUESTION)
    # every worked example shows its own peak list, and the answers name the peak tokens' concept
    for m in msgs[1:-1:2]:
        assert "\n\nPeak tokens: " in m["content"] and m["content"].endswith(QUESTION)
    # the v2 prompt (side-by-side runs): no peak list, the old question and the first six examples only
    old = build_explain_messages(segs, 5.0, rotation=0, style="v2")
    assert "Peak tokens" not in "".join(m["content"] for m in old) and old[-1]["content"].endswith(QUESTION_V2)
    assert {m["content"] for m in old if m["role"] == "assistant"} <= {e.answer for e in EXAMPLES[:6]}
    with pytest.raises(ValueError):
        build_explain_messages(segs, 5.0, style="v9")


def test_a_reply_naming_another_word_is_not_a_copy_of_the_word_example():
    assert copied_reason("the word 'attack'", ["the terror attack in Paris"]) is None
    assert copied_reason("the word 'water'", ["the terror attack in Paris"]) is not None


def test_the_peak_list_reads_the_strong_excerpts_only_and_skips_empty_tokens():
    from safesail.interpret.prompts.explain import peak_summary, strong_peaks

    segs = [{"tokens": [" violent", " outbursts"], "acts": [5.0, 1.0]},
            {"tokens": ["为什么", "", "恐怖分"], "acts": [0.0, 4.0, 1.0]},   # a byte the next token completes
            {"tokens": [" different", " amounts"], "acts": [2.0, 0.0]},    # a weak excerpt: below half the top
            {"tokens": [" the", ""], "acts": [0.0, 3.0]}]                  # nothing after it: left out
    assert strong_peaks(segs) == [" violent", "恐怖分", ""]
    assert peak_summary(strong_peaks(segs)) == 'Peak tokens: "violent" (1), "恐怖分" (1)'
    assert peak_summary([""]) == "Peak tokens: (none)"


def test_a_generic_reply_is_retried_once_then_named(smoke_cfg, tiny_model):
    from safesail.interpret.prompts.explain import generic_reason

    assert generic_reason("words") and generic_reason("None") and generic_reason("various tokens")
    assert generic_reason("words related to politics") is None and generic_reason("fear") is None
    cfg = smoke_cfg("explain.concurrency=1", "explain.latents=[2,3]")
    rd = make_collected_run(cfg, tiny_model)
    # latent 2: "words", then a concept; latent 3: generic twice
    llm = ScriptedLLM(["words", "rivers and streams", "none", "Words."])
    run_explain_stage(cfg, [], client=llm)
    recs = {r["latent"]: r for r in _records(rd)}
    assert recs[2]["status"] == "ok" and recs[2]["explanation"] == "rivers and streams"
    assert recs[2]["llm_calls"] == 2 and recs[2]["copied"][0]["reply"] == "words"
    assert recs[3]["status"] == "failed" and recs[3]["reason"] == "generic_reply" and recs[3]["llm_calls"] == 2
