"""The llm group is typed per back end, and a back end is found by its `llm.backend` name."""

import dataclasses

import pytest
from omegaconf import OmegaConf

from safesail.config import CONFIG_DIR, compose
from safesail.config_types import LLMConfig
from safesail.errors import UserError
from safesail.interpret.clients import make_client
from safesail.interpret.clients.cache import CachedClient
from safesail.interpret.clients.local import LocalClient
from safesail.interpret.clients.openai_http import OpenAIClient
from safesail.interpret.clients.registry import backend_class, backend_names, load_llm

LLM_FILES = sorted(p.stem for p in (CONFIG_DIR / "llm").glob("*.yaml"))


@pytest.mark.parametrize("name", LLM_FILES)
def test_every_llm_file_states_exactly_its_back_ends_keys(name):
    yaml = OmegaConf.load(CONFIG_DIR / "llm" / f"{name}.yaml")
    settings = backend_class(yaml.backend).Settings
    declared = {f.name for f in dataclasses.fields(settings)}
    assert set(yaml.keys()) == declared, (f"configs/llm/{name}.yaml and {settings.__qualname__} disagree: "
                                          f"only in the YAML {sorted(set(yaml.keys()) - declared)}, "
                                          f"only in the dataclass {sorted(declared - set(yaml.keys()))}")
    assert isinstance(load_llm(compose([f"llm={name}"]).llm), LLMConfig)


def test_the_yaml_values_reach_the_client_unchanged():
    cfg = compose(["llm=vllm"]).llm
    client = make_client(cfg)  # no cache path: the bare client
    assert isinstance(client, OpenAIClient) and not isinstance(client, CachedClient)
    assert (client.context_window, client.max_retries, client.backoff_base_s, client.logprobs_top_n) == \
        (32768, 5, 0.5, 20) and client.supports_prompt_logprobs
    openai = load_llm(compose(["llm=openai"]).llm)
    assert openai.context_window == 128000  # from configs/llm/openai.yaml, not a default in code


def test_back_ends_are_registered_by_name():
    assert {"local", "openai"} <= set(backend_names())
    assert backend_class("local") is LocalClient and backend_class("openai") is OpenAIClient


def test_unknown_back_end_and_wrong_type_are_one_sentence(tmp_path):
    cfg = compose(["llm=vllm"]).llm
    cfg.backend = "carrier-pigeon"
    with pytest.raises(UserError, match=r"^llm\.backend 'carrier-pigeon' is unknown; use one of http, local, openai"):
        make_client(cfg)
    cfg = compose(["llm=vllm"]).llm
    cfg.max_retries = "many"
    with pytest.raises(UserError, match=r"^llm\.max_retries must be an integer, not 'many'"):
        make_client(cfg, tmp_path / "cache.sqlite")
    cfg = compose(["llm=vllm"]).llm
    del cfg["backoff_max_s"]
    with pytest.raises(UserError, match=r"lacks llm\.backoff_max_s"):
        OpenAIClient.from_cfg(cfg)


def test_a_cached_client_wraps_the_back_end(tmp_path):
    client = make_client(compose(["llm=vllm"]).llm, tmp_path / "cache.sqlite")
    assert isinstance(client, CachedClient)
