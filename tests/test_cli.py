"""The `safesail` command line and the Hydra config: argument splitting, composition, overrides, multirun."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from safesail.cli import STAGES, main, split_args
from safesail.config import compose


def test_split_args_separates_hydra_from_stage_words():
    hydra, stage = split_args(["search", "violence", "experiment=smoke", "+extra.key=1", "~wandb", "-m",
                               "--cfg", "job", "--json", "How do I?", "model.layers=[0,8]"])
    assert hydra == ["experiment=smoke", "+extra.key=1", "~wandb", "-m", "--cfg", "job", "model.layers=[0,8]"]
    assert stage == ["search", "violence", "--json", "How do I?"]
    # a sentence with an '=' in it is not an override
    assert split_args(["what is 2+2=4 ?"]) == ([], ["what is 2+2=4 ?"])


def test_default_config_is_the_embedded_model_on_bundled_data():
    cfg = compose([])
    assert cfg.model.name == "smollm2-135m-instruct" and cfg.model.source == "smollm2"
    assert list(cfg.model.layers) == [0, 7, 14, 21, 29] and cfg.model.hook_site == "mlp_out"
    assert cfg.data.name == "bundled" and cfg.data.ctx_len == 256 and cfg.data.max_tokens is None
    assert cfg.cache.dtype == "bfloat16" and cfg.cache.batch_size == 8 and cfg.cache.eval_every == 20
    assert cfg.run.dir == "runs/demo"


def test_experiment_and_overrides_compose():
    cfg = compose(["experiment=smoke", "data.ctx_len=32", "cache.dtype=float16", "run.name=mine",
                   "model.layers=[1,2]"])
    assert cfg.model.name == "tiny" and cfg.data.max_tokens == 8192
    assert cfg.data.ctx_len == 32 and cfg.cache.dtype == "float16" and list(cfg.model.layers) == [1, 2]
    assert cfg.run.dir == "runs/mine"
    qwen = compose(["model=qwen2.5-3b-instruct"])
    assert list(qwen.model.layers) == [0, 8, 17, 26, 35] and qwen.model.dtype == "bfloat16"
    files = compose(["data=files", "data.paths=[/some/folder]"])
    assert list(files.data.paths) == ["/some/folder"] and files.data.ctx_len == 256
    with pytest.raises(Exception):
        compose(["cache.no_such_key=1"])


def test_unknown_stage_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2 and "unknown stage" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "cache" in capsys.readouterr().out
    assert "cache" in STAGES


def test_cache_stage_refuses_stray_words(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["cache", "please", "experiment=smoke", f"run.root={tmp_path}"])
    assert e.value.code == 2 and "takes no arguments" in capsys.readouterr().err


def test_multirun_runs_each_job_into_its_run_dir(tmp_path, cache_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(["cache", "-m", "experiment=smoke", "run.name=a,b", f"run.root={tmp_path}", "device=cpu",
              "data.max_tokens=640", "cache.batch_size=5"])
    finally:
        torch.set_num_threads(threads)
    for name in ("a", "b"):
        meta = json.loads((tmp_path / name / "activations" / "layers.1.mlp_out" / "meta.json").read_text())
        assert meta["status"] == "complete" and meta["num_tokens"] == 640
        assert OmegaConf.load(tmp_path / name / "config.yaml").run.name == name
