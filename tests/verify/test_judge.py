"""The sufficiency judge: parsing, position bias removed by asking both orders, graded p_yes comparisons
and their intervals (a judge double; the real judge is validated in benchmarks/bench_verify_sufficiency.py)."""

from __future__ import annotations

import asyncio

import pytest

from safesail.interpret.clients.base import Completion, PromptLogprobs
from safesail.verify.checks import Answers, CheckSettings, QuerySet, Verifier
from safesail.verify.judge import PairItem, debiased, judge_many, pair_messages, parse_choice, sign_test_p


@pytest.mark.parametrize("reply, want", [("A", "A"), ("B.", "B"), (" b", "B"), ("Text A", "A"), ("**B**", "B"),
                                         ("Neither", None), ("", None), (None, None), ("AB", None)])
def test_parse_choice(reply, want):
    assert parse_choice(reply) == want


def test_both_orders_cancel_a_position_bias_exactly():
    # log-odds of A over B: x first = pref + bias, x second = -pref + bias
    assert debiased(3.0 + 1.5, -3.0 + 1.5) == (3.0, 1.5)
    assert debiased(1.0, 1.0) == (0.0, 1.0)


def test_pair_messages_put_the_question_before_the_texts():
    user = pair_messages("violence", "first text", "second text")[-1]["content"]
    assert user.index("Topic: violence") < user.index("Text A: first text") < user.index("Text B: second text")


def test_sign_test():
    assert sign_test_p(0, 0) == 1.0 and sign_test_p(6, 6) == 1.0
    assert abs(sign_test_p(10, 2) - 0.03857) < 1e-4
    assert sign_test_p(12, 0) < 0.001


class _Tok:
    def apply_chat_template(self, msgs, tokenize=False, add_generation_prompt=True):
        return "\n".join(m["content"] for m in msgs) + "\n"


class _LogprobClient:
    """A client double with prompt log-probabilities: p(yes) high when the text mentions porn; A preferred
    by 1 nat whatever the texts (a position bias), plus 2 nats for the text that mentions porn."""
    supports_prompt_logprobs = True

    def chat_prompt(self, msgs):
        return _Tok().apply_chat_template(msgs)

    async def prompt_logprobs(self, prompt, candidates, slots_ending_with=None):
        if "Text A:" in prompt:
            a, b = prompt.split("Text A:")[1].split("Text B:")
            d = 1.0 + 2.0 * ("porn" in a) - 2.0 * ("porn" in b)
            lp = {"A": d / 2, "B": -d / 2}
        else:
            yes = "porn" in prompt.split("Text:")[1]
            lp = {"yes": -0.1 if yes else -2.5, "no": -2.5 if yes else -0.1}
        return PromptLogprobs(tokens=["x"], next_logprobs=[{c: v for c, v in lp.items() if c in candidates}],
                              prompt_tokens=1)

    async def chat(self, req):
        raise AssertionError("the logprob path should not fall back to a text reply")


class _TextClient:
    supports_prompt_logprobs = False

    async def chat(self, req):
        text = req.messages[-1]["content"]
        return Completion(text="A" if "Text A:" in text else ("yes" if "porn" in text else "no"), model="m",
                          prompt_tokens=1, completion_tokens=1)


def test_judge_many_reads_log_odds_and_falls_back_to_a_text_reply():
    loop = asyncio.new_event_loop()
    items = [("sex", "a porn film"), ("sex", "bread"), PairItem("sex", "porn", "bread", True),
             PairItem("sex", "porn", "bread", False)]
    p_yes_on, p_yes_off, d1, d2 = judge_many(loop, _LogprobClient(), items)
    assert p_yes_on > 0.9 and p_yes_off < 0.1
    assert debiased(d1, d2) == pytest.approx((2.0, 1.0))
    assert judge_many(loop, _TextClient(), items) == [1.0, 0.0, 1.0, 1.0]
    loop.close()


def _answers(texts):
    return Answers([[i] for i in range(len(texts))], list(texts), [0.0] * len(texts), [False] * len(texts))


def _verifier(modes=("paired", "absolute")):
    loop = asyncio.new_event_loop()
    client = _LogprobClient()
    return Verifier(None, CheckSettings(n_boot=200, judge_modes=modes), lambda items: judge_many(loop, client, items))


def _qs(n):
    qs = QuerySet("pornography", ["en"] * n, [[1]] * n, [[1]] * n)
    qs.base_neutral = _answers([f"bread recipe {k}" for k in range(n)])
    return qs


BASE = {"hook": "layers.7.mlp_out", "layer": 7, "latent": 700, "target": "latent", "domain": "pornography"}


def test_a_judge_that_sees_the_topic_wins_against_the_control_with_its_position_bias_reported():
    n = 16
    v = _verifier()
    steered = _answers([f"porn film {k}" for k in range(n)])
    control = _answers([f"weather today {k}" for k in range(n)])
    got = v.sufficiency(BASE, "sex", steered, _qs(n), control, dict(BASE, latent=3, target="random_latent"))
    recs = {e.metric: e for e in got if e.target == "latent"}
    win = recs["paired_win_vs_random"]
    assert win.value == 1.0 and win.ci_low == 1.0 and win.details["wins"] == n
    assert win.details["sign_test_p"] < 0.001
    assert win.details["position_bias"] == pytest.approx(1.0) and win.details["mean_preference"] == pytest.approx(2.0)
    assert recs["paired_win_vs_unsteered"].value == 1.0
    # graded absolute judgements, compared on the same query
    assert recs["p_yes_win_vs_random"].value == 1.0 and recs["p_yes_win_vs_random"].ci_low == 1.0
    assert recs["p_yes_vs_random"].value > 0.8 and recs["p_yes_vs_random"].ci_low > 0.8
    assert recs["on_concept_rate"].value == 1.0 and recs["on_concept_vs_random"].value == 1.0
    assert [e.value for e in got if e.target == "random_latent"] == [0.0]


def test_no_effect_gives_one_half_whatever_the_position_bias():
    n = 20
    v = _verifier()
    steered = _answers([f"weather {k}" for k in range(n)])
    control = _answers([f"garden {k}" for k in range(n)])
    win = v.paired(BASE, "sex", steered, control, "random")
    assert win.value == 0.5 and win.details["ties"] == n and win.details["first_chosen"] == 1.0
    assert win.details["position_bias"] == pytest.approx(1.0)


def test_equal_answers_are_ties_and_never_asked():
    v = _verifier()
    steered, control = _answers(["same", "porn"]), _answers(["same", "bread"])
    win = v.paired(BASE, "sex", steered, control, "random")
    assert win.details["ties"] == 1 and win.details["wins"] == 1 and win.value == 0.75
    assert not any(isinstance(k, PairItem) and k.x == "same" for k in v._verdicts)


def test_judge_modes_choose_the_figures():
    steered, control = _answers(["a porn", "b"]), _answers(["c", "d"])
    cbase = dict(BASE, latent=2, target="random_latent")
    only_paired = {e.metric for e in _verifier(("paired",)).sufficiency(BASE, "sex", steered, _qs(2), control, cbase)}
    assert only_paired == {"paired_win_vs_random", "paired_win_vs_unsteered"}
    v = _verifier(("absolute",))
    items = v.judge_items("sex", steered, _qs(2), control)
    assert items and not any(isinstance(it, PairItem) for it in items)
    metrics = {e.metric for e in v.sufficiency(BASE, "sex", steered, _qs(2), control, cbase) if e.target == "latent"}
    assert {"p_yes_win_vs_random", "p_yes_vs_random", "on_concept_vs_random", "p_yes_win_vs_unsteered"} <= metrics
