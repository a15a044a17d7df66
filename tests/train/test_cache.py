"""The cache stage end to end on the tiny model, and the ActivationStore reading it."""

import json

import pytest
import torch

from cache_helpers import snapshot, write_corpus
from safesail.config import compose
from safesail.corpus import iter_documents, pack_windows
from safesail.errors import UserError
from safesail.hooks import HookPoint, capture_activations, special_token_mask
from safesail.train.activation_store import ActivationStore
from safesail.train.cache import run_cache_stage

HOOKS = ["layers.0.mlp_out", "layers.1.mlp_out", "layers.3.mlp_out"]


@pytest.fixture(scope="module")
def cached(tmp_path_factory, cache_dir):
    """One smoke-experiment cache of a small generated corpus (3 hooks, 64-token windows)."""
    root = tmp_path_factory.mktemp("cache")
    corpus = write_corpus(root / "corpus", n=240)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model's small matmuls crawl when threads outnumber free cores
    cfg = compose(["experiment=smoke", f"run.root={root / 'runs'}", f"cache_dir={cache_dir}", "device=cpu",
                   f"data.paths=[{corpus}]", "data.max_tokens=6400", "cache.batch_size=4"])
    try:
        run_cache_stage(cfg, [])
    finally:
        torch.set_num_threads(threads)
    return cfg, root / "runs" / "smoke"


def test_cache_writes_documented_files(cached, tiny_model):
    cfg, run = cached
    for hook in HOOKS:
        meta = json.loads((run / "activations" / hook / "meta.json").read_text())
        assert meta["format"] == "safesail-activations" and meta["status"] == "complete"
        assert meta["model"] == "tiny" and meta["hook"] == hook and meta["d"] == 64
        assert meta["ctx_len"] == 64 and meta["dtype"] == "bfloat16"
        assert meta["num_windows"] == 100 and meta["num_tokens"] == 6400
        assert meta["splits"]["eval"]["windows"] == 5 and meta["splits"]["train"]["windows"] == 95
        assert len(meta["shards"]) == 25
    assert json.loads((run / "stages" / "cache.json").read_text())["status"] == "done"
    assert (run / "config.yaml").exists()


def test_cached_tokens_and_activations_match_the_model(cached, tiny_model):
    cfg, run = cached
    lm = tiny_model
    wins = list(pack_windows(iter_documents(cfg.data, lm.tokenizer, cfg.model.system_prompt), lm.tokenizer,
                             64, 6400))
    store = ActivationStore(run / "activations" / "layers.1.mlp_out")
    rows = {}
    for sh in store.iter_shards():
        for j, w in enumerate(sh["windows"].tolist()):
            rows[w] = {k: sh[k][j * 64:(j + 1) * 64] for k in ("tokens", "doc_ids", "positions", "special",
                                                                   "activations")}
    assert sorted(rows) == list(range(100))
    for w in wins:
        assert rows[w.index]["tokens"].tolist() == w.input_ids
        assert rows[w.index]["doc_ids"].tolist() == w.doc_ids
        assert rows[w.index]["positions"].tolist() == w.positions
    ids = torch.tensor([wins[i].input_ids for i in (0, 37, 99)])
    ref = capture_activations(lm.model, ids, None, [HookPoint(1)])["layers.1.mlp_out"]
    for k, i in enumerate((0, 37, 99)):
        assert torch.allclose(rows[i]["activations"].float(), ref[k], atol=1e-2, rtol=1e-2)
        assert torch.equal(rows[i]["special"], special_token_mask(lm.tokenizer, ids[k]))
    assert any(r["special"].any() for r in rows.values())  # chat templates put special tokens in


def test_rerun_of_finished_stage_does_nothing(cached, caplog):
    cfg, run = cached
    before = snapshot(run / "activations")
    with caplog.at_level("INFO"):
        run_cache_stage(cfg, [])
    assert "already done" in caplog.text
    assert snapshot(run / "activations") == before


def test_batches_cover_train_rows_once_and_are_deterministic(cached):
    _, run = cached
    store = ActivationStore(run / "activations" / "layers.0.mlp_out")
    train = torch.cat([sh["activations"][~sh["special"]] for sh in store.iter_shards("train")]).float()
    assert train.shape[0] == store.split_tokens("train")
    got = list(store.iter_batches(256, seed=3, buffer_tokens=1024, drop_last=False))
    assert all(b.shape == (256, 64) and b.dtype == torch.float32 for b in got[:-1])
    flat = torch.cat(got)
    assert sorted(map(tuple, flat.tolist())) == sorted(map(tuple, train.tolist()))  # same rows, each once
    again = list(store.iter_batches(256, seed=3, buffer_tokens=1024, drop_last=False))
    assert all(torch.equal(a, b) for a, b in zip(got, again))
    other = next(store.iter_batches(256, seed=4, buffer_tokens=1024))
    assert not torch.equal(other, got[0])
    # shuffled: the first batch mixes rows from several shards, not one shard's block
    assert not torch.equal(got[0], train[:256])


def test_start_batch_and_ranks(cached):
    _, run = cached
    store = ActivationStore(run / "activations" / "layers.3.mlp_out")
    full = list(store.iter_batches(100, seed=1, buffer_tokens=800))
    assert len(full) == store.num_batches(100)
    tail = list(store.iter_batches(100, seed=1, buffer_tokens=800, start_batch=17))
    assert len(tail) == len(full) - 17 and all(torch.equal(a, b) for a, b in zip(full[17:], tail))
    r0 = list(store.iter_batches(100, seed=1, buffer_tokens=800, rank=0, world_size=2))
    r1 = list(store.iter_batches(100, seed=1, buffer_tokens=800, rank=1, world_size=2))
    assert all(torch.equal(a, b) for a, b in zip(r0, full[0::2]))
    assert all(torch.equal(a, b) for a, b in zip(r1, full[1::2]))
    half = next(store.iter_batches(8, dtype=torch.float16))
    assert half.dtype == torch.float16


def test_eval_split_is_held_out(cached):
    _, run = cached
    store = ActivationStore(run / "activations" / "layers.0.mlp_out")
    eval_rows = torch.cat([sh["activations"][~sh["special"]] for sh in store.iter_shards("eval")]).float()
    assert eval_rows.shape[0] == store.split_tokens("eval") > 0
    eval_windows = [w for sh in store.iter_shards("eval") for w in sh["windows"].tolist()]
    assert sorted(eval_windows) == [19, 39, 59, 79, 99]
    train_windows = {w for sh in store.iter_shards("train") for w in sh["windows"].tolist()}
    assert not train_windows & set(eval_windows) and len(train_windows) == 95
    got = torch.cat(list(store.iter_batches(64, split="eval", shuffle=False, drop_last=False)))
    assert torch.equal(got, eval_rows)
    toks = list(store.iter_token_windows("eval"))
    assert len(toks) == 5 and all(t.shape == (64,) and t.dtype == torch.int64 for t in toks)
    by_window = {w: sh["tokens"].view(-1, 64)[j] for sh in store.iter_shards() for j, w in enumerate(sh["windows"].tolist())}
    assert all(torch.equal(t, by_window[w].long()) for t, w in zip(toks, [19, 39, 59, 79, 99]))


def test_store_refuses_missing_foreign_and_incomplete(tmp_path, cached):
    with pytest.raises(UserError, match="run `safesail cache` first"):
        ActivationStore(tmp_path / "nothing")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "meta.json").write_text('{"format": "something-else"}')
    with pytest.raises(UserError, match="not a Safe-SAIL activation cache"):
        ActivationStore(tmp_path / "foreign")
    _, run = cached
    meta = json.loads((run / "activations" / "layers.0.mlp_out" / "meta.json").read_text())
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "meta.json").write_text(json.dumps({**meta, "status": "incomplete"}))
    with pytest.raises(UserError, match="incomplete"):
        ActivationStore(tmp_path / "half")
