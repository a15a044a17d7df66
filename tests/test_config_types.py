"""The typed config groups (safesail/config_types.py) stay in step with the YAML defaults."""

import dataclasses

import pytest
from omegaconf import OmegaConf

from safesail.config import CONFIG_DIR, compose
from safesail.config_types import GROUPS, TrainConfig, check_config, load_group
from safesail.errors import UserError

DEFAULT_FILE = {"model": "model/smollm2-135m-instruct.yaml", "data": "data/bundled.yaml", "sae": "sae/topk-sweep.yaml"}


@pytest.mark.parametrize("group", [g for g in GROUPS if g not in ("run", "llm")])
def test_every_default_yaml_key_has_a_type_and_every_type_a_default(group):
    yaml = OmegaConf.load(CONFIG_DIR / DEFAULT_FILE.get(group, f"{group}/default.yaml"))
    declared = {f.name for f in dataclasses.fields(GROUPS[group])}
    keys = set(yaml.keys()) - {"defaults"}
    assert keys == declared, (f"configs/{DEFAULT_FILE.get(group, group + '/default.yaml')} and "
                              f"config_types.{GROUPS[group].__name__} disagree: only in the YAML "
                              f"{sorted(keys - declared)}, only in the dataclass {sorted(declared - keys)}")


def test_load_group_gives_a_typed_object():
    train = load_group(compose(["experiment=smoke"]).train, TrainConfig)
    assert isinstance(train, TrainConfig) and train.batch_size == 256 and train.eval.tokens == 1024


def test_wrong_type_in_an_experiment_is_one_sentence():
    cfg = compose(["experiment=smoke"])
    cfg.train.epochs = "two"
    with pytest.raises(UserError, match=r"^train\.epochs must be an integer, not 'two'"):
        check_config(cfg)


def test_model_sources_are_hf_tiny_and_every_embedded_model():
    from typing import get_args, get_type_hints

    from safesail.config_types import ModelConfig
    from safesail.models.embedded import EMBEDDED

    assert set(get_args(get_type_hints(ModelConfig)["source"])) == {"hf", "tiny", *EMBEDDED}
