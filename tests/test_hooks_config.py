"""One list of hook points for every stage (`hooks.configured_hooks`): sae.hooks, else model.layers."""

import json

import pytest

from safesail.config import compose
from safesail.errors import UserError
from safesail.hooks import HookPoint, configured_hooks

pytestmark = pytest.mark.usefixtures("one_thread")


def test_configured_hooks_follow_sae_hooks_then_model_layers():
    assert configured_hooks(compose(["experiment=smoke"])) == [HookPoint(0), HookPoint(1), HookPoint(3)]
    cfg = compose(["experiment=smoke", "sae.hooks=[layers.3.resid,layers.1.mlp_out]"])
    assert configured_hooks(cfg) == [HookPoint(1, "mlp_out"), HookPoint(3, "resid")]
    with pytest.raises(UserError, match="out of range: the model has 4 layers"):
        configured_hooks(compose(["experiment=smoke", "model.layers=[0,9]"]), num_layers=4)
    with pytest.raises(UserError, match="not of the form"):
        configured_hooks(compose(["experiment=smoke", "sae.hooks=[layer1]"]))


def test_select_after_training_one_hook(tmp_path, cache_dir):
    from safesail.rundir import RunDir
    from safesail.train.cache import run_cache_stage
    from safesail.train.select_stage import run_select_stage
    from safesail.train.stage import run_train_stage

    base = ["experiment=smoke", f"run.root={tmp_path}", f"cache_dir={cache_dir}", "device=cpu",
            "data.max_tokens=2048", "sae.saes=[{arch: topk, k: 4}]"]
    run_cache_stage(compose(base), [])
    one = [*base, "sae.hooks=[layers.1.mlp_out]"]
    run_train_stage(compose(one), [])
    rd = RunDir.from_cfg(compose(base))
    assert sorted(p.name for p in rd.saes().iterdir() if p.is_dir() and not p.name.startswith(".")) == \
        ["layers.1.mlp_out"]
    with pytest.raises(UserError, match=r"pass sae\.hooks=\[layers\.1\.mlp_out\]"):
        run_select_stage(compose(base), [])
    run_select_stage(compose(one), [])
    selection = json.loads(rd.selection_file.read_text())
    assert list(selection["chosen"]) == ["layers.1.mlp_out"]
