"""On the tiny model: a latent wired to a concept word is ranked first, and its SAE beats a random one."""

from __future__ import annotations

import pytest

from safesail.hooks import HookPoint
from safesail.train import contrastive as C
from safesail.train.pair_activations import capture_pair_activations
from safesail.train.select_stage import SelectSettings, choose, evaluate_sae
from tests.select_helpers import choose_words, random_sae, synthetic_pairs, wired_sae

HOOK = "layers.0.mlp_out"
WIRED = {"politics": 11, "pornography": 22, "violence": 33, "terror": 44}   # latent index per domain


@pytest.fixture(scope="module")
def pair_acts(tiny_model):
    pairs = synthetic_pairs(choose_words(tiny_model))
    pa = capture_pair_activations(tiny_model, pairs, [HookPoint(0)], "You are a helpful assistant.", batch_size=8)
    return pairs, pa


def _tid(tok, word):
    return tok.convert_tokens_to_ids("Ġ" + word)


def test_kept_tokens_leave_out_specials_and_the_shared_prefix(tiny_model, pair_acts):
    pairs, pa = pair_acts
    tok = tiny_model.tokenizer
    assert pa.n_queries == 2 * len(pairs)
    assert not set(pa.token_ids.tolist()) & set(tok.all_special_ids)
    # every query keeps its own words: the concept token occurs in the concept queries only
    for d, (c, _) in choose_words(tiny_model).items():
        rows = pa.query_index[pa.token_ids == _tid(tok, c)]
        assert rows.numel() == 6 and bool((rows % 2 == 0).all())
    # the system prompt's tokens are shared by all queries and are not kept
    from safesail.chat import encode_chat

    ids = encode_chat(tok, pairs[0].concept_query, "You are a helpful assistant.")
    non_special = sum(1 for t in ids if t not in set(tok.all_special_ids))
    kept = int((pa.query_index == 0).sum())
    assert kept <= non_special - len(tok.tokenize("You are a helpful assistant."))
    assert kept >= len(tok.tokenize(pairs[0].concept_query)) - 3   # the query's own words are (nearly) all kept


def test_wired_latent_ranks_first_and_wired_sae_wins(tiny_model, pair_acts):
    pairs, pa = pair_acts
    tok = tiny_model.tokenizer
    acts = pa.acts[HOOK]
    wires = {WIRED[d]: _tid(tok, c) for d, (c, _) in choose_words(tiny_model).items()}
    good = wired_sae(acts, pa.token_ids, wires, 256, HOOK, "tiny", seed=1)
    rand = random_sae(acts.shape[1], 256, HOOK, "tiny", seed=2, center=acts.mean(0))
    settings = SelectSettings.defaults()
    figs_good, stats_good = evaluate_sae(good, acts, pa.query_index, pa.n_queries, pairs, settings)
    figs_rand, stats_rand = evaluate_sae(rand, acts, pa.query_index, pa.n_queries, pairs, settings)
    for d, j in WIRED.items():
        top = C.top_latents(stats_good, d, 5, 0.05)
        assert top[0]["latent"] == j, (d, top[:3])
        assert top[0]["freq"] == 1.0 and top[0]["neutral_rate"] == 0.0
        assert figs_good[d]["l0"]["0.5"] >= 1
    # the wired latents fire only in their own domain
    assert float(stats_good.concept_rate["politics"][WIRED["terror"]]) == 0.0
    assert figs_good["macro"]["i_cdf"] > figs_rand["macro"]["i_cdf"]
    records = [{"name": name, "dir": f"saes/{HOOK}/{name}", "eligible": True, "ineligible_reason": None,
                "train_metrics": {"fvu": fvu}, "score": figs["macro"]["i_cdf"]}
               for name, figs, fvu in (("random", figs_rand, 0.1), ("wired", figs_good, 0.3))]
    chosen = choose(HOOK, records, settings)
    assert chosen["sae"] == "wired" and "highest I_CDF" in chosen["reason"] and "runner-up random" in chosen["reason"]
    # the guardrail excludes the winner when its FVU is above the bound
    records[1]["eligible"], records[1]["ineligible_reason"] = False, "FVU 0.900 above select.max_fvu=0.6"
    assert choose(HOOK, records, settings)["sae"] == "random"
    # and the override wins over everything
    ov = SelectSettings.defaults(override={HOOK: "wired"})
    got = choose(HOOK, records, ov)
    assert got["sae"] == "wired" and got["override"] and "despite the guardrail" in got["reason"]


def test_chance_correction_keeps_a_random_sae_near_zero(pair_acts):
    pairs, pa = pair_acts
    acts = pa.acts[HOOK]
    rand = random_sae(acts.shape[1], 256, HOOK, "tiny", seed=3, center=acts.mean(0))
    figs, _ = evaluate_sae(rand, acts, pa.query_index, pa.n_queries, pairs, SelectSettings.defaults())
    figs_raw, _ = evaluate_sae(rand, acts, pa.query_index, pa.n_queries, pairs,
                               SelectSettings.defaults(correct_for_chance=False))
    assert figs["macro"]["i_cdf"] <= figs_raw["macro"]["i_cdf"]
    assert figs["macro"]["i_cdf"] < 0.05


def test_swapped_word_rank_puts_the_wired_latent_first_and_not_a_broad_one(tiny_model, pair_acts, tmp_path):
    """With the kept tokens' ids, select ranks by word_score: the latent wired to the concept word fires on
    the concept's swapped-in word (word_rate 1), never on the twin's, never on shared words; a latent that
    fires on every query's shared tokens gets a negative score and is no candidate."""
    import torch

    pairs, pa = pair_acts
    tok = tiny_model.tokenizer
    acts = pa.acts[HOOK]
    wires = {WIRED[d]: _tid(tok, c) for d, (c, _) in choose_words(tiny_model).items()}
    good = wired_sae(acts, pa.token_ids, wires, 256, HOOK, "tiny", seed=1)
    settings = SelectSettings.defaults()
    _, stats = evaluate_sae(good, acts, pa.query_index, pa.n_queries, pairs, settings, token_ids=pa.token_ids)
    for d, j in WIRED.items():
        top = C.top_latents(stats, d, 5, 0.05, rank="word")
        assert top[0]["latent"] == j, (d, top[:3])
        assert top[0]["word_rate"] == 1.0 and top[0]["word_reverse_rate"] == 0.0 and top[0]["shared_rate"] == 0.0
        assert top[0]["score"] == 1.0
    assert bool((stats.word_score["all"] <= 1.0).all())
    # the stats survive the safetensors round trip that select's cache and pairstats file use
    from safesail.train.selection import save_tensors
    from safetensors.torch import load_file

    save_tensors(tmp_path / "s.safetensors", C.stats_tensors(stats))
    back = C.stats_from_tensors(load_file(str(tmp_path / "s.safetensors")))
    assert torch.equal(back.word_score["terror"], stats.word_score["terror"])
    # without token ids there are no word figures and rank=word falls back to freq
    _, plain = evaluate_sae(good, acts, pa.query_index, pa.n_queries, pairs, settings)
    assert not plain.word_score and C.top_latents(plain, "terror", 1, 0.05, rank="word")[0]["latent"] == WIRED["terror"]
