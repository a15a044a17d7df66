"""The cache under damaged files and a full disk (issue 16, items 3 and 4).

A shard cut short after the cache finished must be named by the reader with the remedy, and
`safesail cache` must recompute it rather than say "already done". A full disk during `cache`
is one sentence, and the run afterwards completes the same cache an uninterrupted run writes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from cache_helpers import assert_one_sentence, write_corpus
from safesail.cli import main
from safesail.config import compose
from safesail.errors import UserError
from safesail.train import cache_shards
from safesail.train.activation_store import ActivationStore
from safesail.train.cache import run_cache_stage

HOOKS = ["layers.0.mlp_out", "layers.1.mlp_out", "layers.3.mlp_out"]
TOKENS = 1280  # 20 windows of 64 tokens: 5 shards of 4 windows per hook

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "c", n=300)


def overrides(root: Path, corpus: Path) -> list[str]:
    return ["experiment=smoke", f"run.root={root}", "device=cpu", f"data.paths=[{corpus}]",
            f"data.max_tokens={TOKENS}", "cache.batch_size=4"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, cache_dir):
    root = tmp_path_factory.mktemp("ref")
    run_cache_stage(compose(overrides(root, corpus)), [])
    return root / "smoke"


def windows_of(run: Path, hook: str) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for sh in ActivationStore(run / "activations" / hook).iter_shards():
        for j, w in enumerate(sh["windows"].tolist()):
            assert w not in out
            out[w] = (sh["tokens"][j * 64:(j + 1) * 64], sh["activations"][j * 64:(j + 1) * 64].float())
    return out


def assert_same_cache(run: Path, ref: Path) -> None:
    for hook in HOOKS:
        got, want = windows_of(run, hook), windows_of(ref, hook)
        assert sorted(got) == sorted(want) == list(range(TOKENS // 64))
        for w in want:
            assert torch.equal(got[w][0], want[w][0])
            assert torch.allclose(got[w][1], want[w][1], atol=2e-2, rtol=2e-2)


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(["cache", *argv])
    return e.value.code, capsys.readouterr().err


def test_truncated_shard_is_named_on_read_and_recomputed_by_cache(tmp_path, corpus, reference, capsys, caplog):
    run_cache_stage(compose(overrides(tmp_path, corpus)), [])
    folder = tmp_path / "smoke" / "activations" / HOOKS[1]
    shard = sorted(folder.glob("w*.safetensors"))[2]
    size = shard.stat().st_size
    assert size > 20_000
    with open(shard, "r+b") as f:
        f.truncate(20_000)
    # Reading (what `safesail train` does first) names the shard and the remedy, in one sentence.
    with pytest.raises(UserError) as e:
        ActivationStore(folder)
    msg = str(e.value)
    assert shard.name in msg and "safesail cache" in msg and "20,000 bytes" in msg
    assert_one_sentence(msg)
    # `safesail cache` does not say "already done": it recomputes that shard only.
    others = {p.name: p.read_bytes() for p in folder.glob("w*.safetensors") if p != shard}
    code = None
    try:
        main(["cache", *overrides(tmp_path, corpus)])
    except SystemExit as ex:
        code = ex.code
    assert code in (None, 0), capsys.readouterr().err
    assert shard.stat().st_size == size
    assert {p.name: p.read_bytes() for p in folder.glob("w*.safetensors") if p != shard} == others
    assert_same_cache(tmp_path / "smoke", reference)


def test_damaged_header_is_named(tmp_path, corpus, reference):
    run_cache_stage(compose(overrides(tmp_path, corpus)), [])
    folder = tmp_path / "smoke" / "activations" / HOOKS[0]
    shard = sorted(folder.glob("w*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:20] = b"\x00" * 12  # the JSON header no longer parses; the size is unchanged
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match=shard.name):
        ActivationStore(folder)
    run_cache_stage(compose(overrides(tmp_path, corpus)), [])
    assert_same_cache(tmp_path / "smoke", reference)


def test_a_shard_damaged_after_opening_is_named_when_read(tmp_path, corpus, reference):
    run_cache_stage(compose(overrides(tmp_path, corpus)), [])
    folder = tmp_path / "smoke" / "activations" / HOOKS[2]
    store = ActivationStore(folder)
    shard = store.shard_paths()[1]
    with open(shard, "r+b") as f:
        f.truncate(5_000)
    with pytest.raises(UserError, match=shard.name) as e:
        sum(b.shape[0] for b in store.iter_batches(256, shuffle=False))
    assert "safesail cache" in str(e.value)


def test_disk_full_is_one_sentence_and_the_resume_is_exact(tmp_path, corpus, reference, capsys, monkeypatch):
    real = cache_shards.save_file
    calls = {"n": 0}

    def fills_up(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] > 4:  # what safetensors raises when the disk fills during a write
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(cache_shards, "save_file", fills_up)
    code, err = run_cli(capsys, *overrides(tmp_path, corpus))
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "disk is full" in lines[0] and "Traceback" not in err, err
    assert_one_sentence(lines[0].removeprefix("error: "))
    folder = tmp_path / "smoke" / "activations" / HOOKS[0]
    assert not list(folder.glob(".*.tmp"))  # the partial file is not left to fill the disk further
    monkeypatch.setattr(cache_shards, "save_file", real)
    run_cache_stage(compose(overrides(tmp_path, corpus)), [])
    assert_same_cache(tmp_path / "smoke", reference)
