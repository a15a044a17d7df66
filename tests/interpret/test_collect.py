"""The collect stage: running statistics, level sampling, segments, resume (tiny model + a stand-in SAE)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from safesail.interpret.collect import CollectSettings, HookInputs, collect_latents
from safesail.interpret.latent_stats import LatentHistogram, RunningLatentStats, quantile_from_top
from safesail.interpret.segments import LevelReservoir, SegmentSpec, deal_splits, level_of, segment_span

from collect_helpers import StandInSAE, _windows, collect_group, collect_settings

HOOK = "layers.1.mlp_out"


def test_quantile_interpolates_like_numpy():
    x = torch.rand(3, 5000) ** 4
    top = torch.topk(x, 64, dim=1).values
    q, exact = quantile_from_top(top, 5000, 0.999)
    assert exact
    np.testing.assert_allclose(q.numpy(), np.quantile(x.numpy(), 0.999, axis=1), rtol=1e-5)
    _, exact_small_k = quantile_from_top(top[:, :2], 5000, 0.999)
    assert not exact_small_k


def test_running_stats_match_a_single_pass():
    x = torch.relu(torch.randn(900, 5) - 0.5)
    st = RunningLatentStats(5, 16)
    for i in range(0, 900, 128):
        st.update(x[i:i + 128], torch.arange(i, min(i + 128, 900)))
    out, _ = st.finish()
    assert torch.equal(out["top_acts"], torch.topk(x.T, 16).values)
    assert torch.equal(out["bottom_acts"], torch.topk(x.T, 16, largest=False).values)
    assert torch.allclose(out["density"], (x > 0).float().mean(0))
    # The kept token indices point at the top values.
    assert torch.equal(x.T.gather(1, st.top_idx), out["top_acts"])
    h = LatentHistogram(out["max_act"], 8)
    h.update(x)
    assert torch.equal(h.counts.sum(1), (x > 0).sum(0))


def test_levels_and_reservoir_sample_every_level():
    max_act = torch.tensor([10.0])
    assert level_of(torch.tensor([0.5, 1.0, 1.01, 9.99, 10.0]), max_act.expand(5), 10).tolist() == [0, 0, 1, 9, 9]
    res = LevelReservoir(m=1, n_levels=10, size=3, seed=1)
    acts = torch.linspace(0.01, 10.0, 1000)
    for i in range(0, 1000, 100):  # streamed in blocks
        a = acts[i:i + 100]
        res.update(torch.zeros(100, dtype=torch.long), level_of(a, max_act.expand(100), 10),
                   torch.arange(i, i + 100), a)
    items = res.items(0)
    per_level = {}
    for lvl, tok, act, _p, _r in items:
        per_level.setdefault(lvl, []).append(act)
        assert lvl * 1.0 < act <= (lvl + 1) * 1.0 + 1e-6
    assert sorted(per_level) == list(range(10)) and all(len(v) == 3 for v in per_level.values())


def test_segment_span_stays_in_its_document_and_splits_are_disjoint():
    doc_row = [0] * 10 + [1] * 20 + [2] * 4
    assert segment_span(doc_row, 12, 8, 0.75) == (10, 18)
    assert segment_span(doc_row, 25, 8, 0.75) == (20, 28)
    a, b = segment_span(doc_row, 31, 8, 0.75)
    assert (a, b) == (30, 34)
    specs = [SegmentSpec(1, "activating", 0, 0, s, s + 5, s + 2) for s in (0, 2, 10, 20, 30, 40)]
    got = deal_splits(specs, 2, 2)
    assert [g.start for g in got] == [0, 10, 20, 30]  # the one overlapping start=0 is skipped
    assert [g.split for g in got] == ["explain", "score", "explain", "score"]


def _run(tiny_model, windows, out_root, settings, fp="fp1", sae=None):
    sae = sae or StandInSAE(tiny_model.hidden_size, 24)
    hooks = [HookInputs(HOOK, sae, list(range(24)), out_root / HOOK, {"which_latents": "list"})]
    return collect_latents(tiny_model, hooks, iter(windows), out_root, settings, fp, {"model": "tiny"},
                           len(windows))


def test_collect_writes_stats_and_segments(tiny_model, tmp_path):
    windows = _windows(tiny_model, tmp_path)
    s = collect_settings(k_top=32, n_bins=8, n_levels=4, segment_len=10, explain_per_level=2, score_per_level=2,
                         random_explain=1, random_score=2, random_pool=64, min_examples=3, batch_size=4)
    sae = StandInSAE(tiny_model.hidden_size, 24)
    _run(tiny_model, windows, tmp_path / "latents", s, sae=sae)
    out = tmp_path / "latents" / HOOK
    st = load_file(str(out / "stats.safetensors"))
    m = 24
    assert st["latent_ids"].tolist() == list(range(m)) and st["latent_ids"].dtype == torch.int64
    assert st["top_acts"].shape == (m, 32) and st["bottom_acts"].shape == (m, 32)
    assert st["hist_counts"].shape == (m, 8) and st["hist_edges"].shape == (m, 9)
    assert bool((st["top_acts"][:, :-1] >= st["top_acts"][:, 1:]).all())
    assert bool((st["bottom_acts"][:, :-1] <= st["bottom_acts"][:, 1:]).all())
    # Ground truth: encode every non-special token directly.
    from safesail.hooks import HookPoint, capture_activations, special_token_mask

    ids = torch.tensor([w.input_ids for w in windows])
    acts = capture_activations(tiny_model.model, ids, None, [HookPoint.parse(HOOK)])[HOOK]
    codes = sae.encode(acts.reshape(-1, acts.shape[-1]))[~special_token_mask(tiny_model.tokenizer, ids).reshape(-1)]
    assert torch.allclose(st["max_act"], codes.max(0).values, atol=1e-5)
    assert torch.allclose(st["density"], (codes > 0).float().mean(0), atol=1e-6)
    assert torch.allclose(st["quantile_999"], torch.quantile(codes, 0.999, dim=0), rtol=1e-3, atol=1e-5)
    assert torch.equal(st["hist_counts"].sum(1), (codes > 0).sum(0))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_tokens"] == codes.shape[0] and meta["layer"] == 1 and meta["complete"]
    assert meta["too_few"][0]["latent"] == 0 and "never fires" in meta["too_few"][0]["reason"]

    segs = [json.loads(x) for x in (out / "segments.jsonl").read_text().splitlines()]
    by_latent = {}
    for r in segs:
        assert set(r) >= {"hook", "latent", "segment_id", "split", "kind", "level", "doc_id", "start",
                          "token_ids", "tokens", "acts"}
        assert len(r["token_ids"]) == len(r["tokens"]) == len(r["acts"]) <= 10
        by_latent.setdefault(r["latent"], []).append(r)
        if r["kind"] == "random":
            assert r["level"] is None and max(r["acts"]) == 0
        else:
            mx = float(st["max_act"][r["latent"]])
            # The segment's peak lies in (or above) its level's interval.
            assert max(r["acts"]) > r["level"] * mx / 4 - 1e-5
    # The dead latent has no activating segment (and is listed as too_few).
    assert {r["kind"] for r in by_latent[0]} == {"random"}
    busy = max(by_latent, key=lambda j: float(st["density"][j]))
    levels = {r["level"] for r in by_latent[busy] if r["kind"] == "activating"}
    assert len(levels) >= 3
    for j, rs in by_latent.items():
        assert len({r["segment_id"] for r in rs}) == len(rs)
        ex = {(r["doc_id"], p) for r in rs if r["split"] == "explain" for p in range(r["start"], r["start"] + len(r["acts"]))}
        sc = {(r["doc_id"], p) for r in rs if r["split"] == "score" for p in range(r["start"], r["start"] + len(r["acts"]))}
        assert not ex & sc, f"latent {j}: explain and score segments share tokens"
    assert {r["split"] for r in by_latent[busy]} == {"explain", "score"}
    assert {r["kind"] for r in by_latent[busy]} == {"activating", "random"}


def test_collect_resumes_after_a_kill(tiny_model, tmp_path):
    windows = _windows(tiny_model, tmp_path)
    s = collect_settings(k_top=16, n_bins=4, n_levels=3, segment_len=8, random_pool=32, batch_size=4)
    sae = StandInSAE(tiny_model.hidden_size, 24)

    def dying(ws, after):
        for i, w in enumerate(ws):
            if i == after:
                raise KeyboardInterrupt("killed")
            yield w

    calls = []
    handle = tiny_model.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        hooks = [HookInputs(HOOK, sae, list(range(24)), tmp_path / "a" / HOOK, {})]
        with pytest.raises(KeyboardInterrupt):
            collect_latents(tiny_model, hooks, dying(windows, 12), tmp_path / "a", s, "fp", {})
        assert len(calls) == 3  # three full batches of 4 were encoded before the kill
        calls.clear()
        collect_latents(tiny_model, hooks, iter(windows), tmp_path / "a", s, "fp", {})
        assert len(calls) == -(-len(windows) // 4) - 3  # only the missing batches ran
        calls.clear()
        collect_latents(tiny_model, hooks, iter(windows), tmp_path / "a", s, "fp", {})
        assert calls == []  # finished: nothing runs again
    finally:
        handle.remove()
    _run(tiny_model, windows, tmp_path / "b", s, fp="fp", sae=sae)
    for name in ("stats.safetensors", "segments.jsonl"):
        a, b = (tmp_path / d / HOOK / name for d in ("a", "b"))
        if name.endswith("jsonl"):
            assert a.read_text() == b.read_text()
        else:
            ta, tb = load_file(str(a)), load_file(str(b))
            assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not (tmp_path / "a" / ".scratch").exists()


def test_segments_do_not_depend_on_the_latent_chunk_size(tiny_model, tmp_path, monkeypatch):
    """Pass 4 runs in chunks of latents for wide SAEs; the output is the same as in one chunk."""
    import safesail.interpret.collect as collect

    windows = _windows(tiny_model, tmp_path, max_tokens=1024)
    s = collect_settings(k_top=16, n_bins=4, n_levels=3, segment_len=8, random_pool=32, batch_size=8)
    sae = StandInSAE(tiny_model.hidden_size, 24)
    _run(tiny_model, windows, tmp_path / "one", s, sae=sae)
    monkeypatch.setattr(collect, "SEGMENT_CHUNK_ROWS", 5 * 3 * s.oversample * 4)  # 5 latents per chunk
    _run(tiny_model, windows, tmp_path / "many", s, sae=sae)
    one, many = ((tmp_path / d / HOOK / "segments.jsonl").read_text() for d in ("one", "many"))
    assert one == many and len(one.splitlines()) > 24



def test_bad_collect_settings_are_user_errors(tmp_path):
    from omegaconf import OmegaConf

    from safesail.errors import UserError
    from safesail.interpret.collect import resolve_latents
    from safesail.rundir import RunDir

    rd = RunDir(tmp_path)
    assert resolve_latents("all", rd, HOOK, 4) == ("all", [0, 1, 2, 3])
    assert resolve_latents(OmegaConf.create([3, 1, 3]), rd, HOOK, 4) == ("list", [1, 3])
    with pytest.raises(UserError, match="out of range"):
        resolve_latents([1, 9], rd, HOOK, 4)
    with pytest.raises(UserError, match="use candidates, all, or a list"):
        resolve_latents("some", rd, HOOK, 4)
    with pytest.raises(UserError, match="safesail select"):  # candidates need selection.json
        resolve_latents("candidates", rd, HOOK, 4)
    with pytest.raises(UserError, match="collect.k_top"):
        CollectSettings.from_cfg(collect_group(k_top=0))
    with pytest.raises(UserError, match="collect.quantile"):
        CollectSettings.from_cfg(collect_group(quantile=1.5))
    with pytest.raises(UserError, match=r"^collect\.k_top must be an integer, not 'many'"):
        CollectSettings.from_cfg(collect_group(k_top="many"))
    partial = collect_group()
    del partial["random_pool"]
    with pytest.raises(UserError, match=r"lacks collect\.random_pool"):
        CollectSettings.from_cfg(partial)
    s = collect_settings()  # the defaults come from configs/collect/default.yaml alone
    assert (s.k_top, s.quantile, s.max_tokens, s.latents, s.seed) == (256, 0.999, 32768, "candidates", 0)
    assert "latents" not in s.stats_key() and s.stats_key()["k_top"] == 256
