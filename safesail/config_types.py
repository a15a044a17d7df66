"""Types of the config groups; the defaults live once, in the YAML files under configs/.

One dataclass per config group names the type of each key (no defaults here: the group's
YAML states them). `load_group(cfg.train, TrainConfig)` gives a typed object of a group;
`check_config(cfg, overridden)` checks every declared key of a composed config, and any
key the command line overrode (an undeclared one takes the type of its YAML default), so
that `sae.k=abc` is one sentence naming the key and what it accepts instead of a traceback
later. Keys a group's YAML has but its dataclass does not declare are not refused here
(other options of a group may carry their own keys, e.g. model=tiny's architecture keys);
tests/test_config_types.py keeps the dataclasses and the default YAML files in step.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence, Union

from omegaconf import DictConfig, ListConfig, OmegaConf

from safesail.errors import UserError


@dataclass
class RunConfig:
    root: str
    name: str
    dir: str
    force: bool
    seed: int


@dataclass
class ModelConfig:
    name: str
    source: Literal["hf", "tiny", "smollm2", "qwen-coder-1.5b", "qwen-coder-0.5b"]   # the last three: embedded (safesail/models/embedded.py)
    path: Optional[str]
    dtype: Literal["float32", "float16", "bfloat16", "auto"]
    revision: Optional[str]
    trust_remote_code: bool
    num_layers: Optional[int]
    layers: list[int]
    hook_site: Literal["mlp_out", "resid"]
    system_prompt: Optional[str]
    max_length: int


@dataclass
class DataConfig:
    name: str
    paths: Optional[list[str]]
    hub: Optional[str]
    hub_config: Optional[str]
    split: str
    text_field: Optional[str]
    messages_field: Optional[str]
    query_field: Optional[str]
    answer_field: Optional[str]
    text_sample_by: str
    ctx_len: int
    max_tokens: Optional[int]


@dataclass
class CacheConfig:
    batch_size: int
    dtype: Literal["bfloat16", "float16", "float32"]
    eval_every: int


@dataclass
class EvalConfig:
    tokens: int
    batch_size: int
    ce_tokens: int
    ce_batch_size: int


@dataclass
class TrainConfig:
    batch_size: int
    epochs: int
    max_tokens: Optional[int]
    shuffle_seed: int
    seed: int
    optimizer: Literal["signum", "adam", "auto"]
    lr: Optional[float]
    enc_init: Literal["decoder", "decoder_scaled"]
    enc_init_scale: float
    lr_warmup_steps: int
    lr_decay_fraction: float
    adam_betas: list[float]
    adam_eps: float
    auxk_alpha: float
    k_aux: Optional[int]
    dead_tokens: Optional[int]
    b_dec_init: Literal["geometric_median", "mean", "zeros"]
    dec_init: Literal["random", "data"]
    resample_every: int
    split_every: int
    split_cos: float
    resample_until: float
    warm_k: int
    warm_until: float
    normalize: bool
    autocast: Union[bool, Literal["auto"]]
    decoder_impl: Literal["auto", "sparse", "dense"]
    device: str
    sae_threads: int
    distributed: Literal["ddp", "sae_parallel"]
    checkpoint_every: int
    overwrite: bool
    log_every: int
    plot: bool
    eval: EvalConfig


@dataclass
class SweepConfig:
    hooks: Optional[list[str]]
    expansion: Optional[float]
    n_latents: Optional[int]
    d_in: Optional[int]
    k: Optional[int]
    arch: Optional[Union[str, list[str]]]
    saes: list[dict]


@dataclass
class SelectConfig:
    pairs: str
    domains: list[str]
    fire_threshold: float
    correct_for_chance: bool
    t_grid: list[float]
    criterion: str
    criterion_t: float
    max_fvu: Optional[float]
    min_ce_loss_recovered: Optional[float]
    candidates_per_domain: int
    candidate_min_freq: float
    candidate_rank: str
    override: dict
    batch_size: int
    chunk_tokens: int
    plot: bool


@dataclass
class CollectConfig:
    data: Optional[Any]
    ctx_len: Optional[int]
    max_tokens: int
    batch_size: int
    latents: Union[str, list[int]]
    k_top: int
    quantile: float
    n_bins: int
    n_levels: int
    segment_len: int
    segment_left: float
    explain_per_level: int
    score_per_level: int
    random_explain: int
    random_score: int
    oversample: int
    random_pool: int
    min_examples: int
    keep_scratch: bool
    seed: int


@dataclass
class DiagnoseConfig:
    db: Optional[str]
    host: str
    port: int
    allowed_hosts: Optional[list[str]]
    max_new_tokens: int
    max_new_tokens_limit: int
    temperature: float
    top: int
    max_query_chars: int
    max_prompt_tokens: int
    max_body_bytes: int
    queue_size: int
    threads: Optional[int]
    request_timeout_s: float
    compare_file: Optional[str]


@dataclass
class DetectionConfig:
    batch_size: int


@dataclass
class FuzzingConfig:
    batch_size: int
    max_marks: int


@dataclass
class ScoreConfig:
    scorers: list[str]
    controls: list[str]
    constant_explanation: str
    bootstrap: int
    min_beats_rate: float
    binary_metric: Literal["balanced_accuracy", "auroc"]
    mode: Literal["auto", "logprobs", "json"]
    min_ok_fraction: float
    granularity: Literal["segment", "query"]
    segments_per_call: int
    query_max_tokens: int
    max_value: int
    prompt_style: str
    json_tokens_per_token: int
    detection: DetectionConfig
    fuzzing: FuzzingConfig
    concurrency: Optional[int]
    hooks: Optional[list[str]]
    max_latents: Optional[int]


@dataclass
class VerifyConfig:
    latents: Union[Literal["tagged", "candidates"], list[str]]
    max_latents: int
    strength_unit: Literal["quantile", "residual"]
    steer_positions: Literal["all", "answer"]
    strength: float
    strength_scan: list[float]
    scan_queries: int
    scan_from_top: bool
    fluency_drop: float
    queries_per_domain: int
    sufficiency_queries: Optional[int]
    sufficiency_prompts: Literal["twins", "open"]
    open_prompts: str
    random_latents: int
    langs: list[str]
    reference_pairs: int
    segments: int
    max_new_tokens: int
    batch_size: int
    wave: int
    judge_batch_size: Optional[int]
    judge_quantize: Literal["none", "int8"]
    top_tokens: int
    n_boot: int
    judge: bool
    judge_modes: list[str]
    reference: bool
    residual_direction: bool
    residual_layer: Optional[int]
    residual_layers: Optional[list[int]]
    residual_coef: float
    seed: int


@dataclass
class LLMConfig:
    """The keys every LLM back end has; a back end's own keys are in its `Settings` subclass of this
    (`safesail/interpret/clients/<backend>.py`), loaded with `clients.registry.load_llm`."""
    backend: str
    name: Optional[str]
    context_window: int
    concurrency: int
    timeout_s: float
    cache: bool


# config group (top-level key) -> its dataclass
GROUPS: dict[str, type] = {"run": RunConfig, "model": ModelConfig, "data": DataConfig, "cache": CacheConfig,
                           "train": TrainConfig, "sae": SweepConfig, "select": SelectConfig,
                           "collect": CollectConfig, "score": ScoreConfig, "diagnose": DiagnoseConfig,
                           "verify": VerifyConfig, "llm": LLMConfig}

_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
          dict: "a mapping", type(None): "null"}


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a).lower() if isinstance(a, bool) else str(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return "a list" + (f" of {_describe(item).removeprefix('an ').removeprefix('a ')}s" if item is not Any else "")
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return _NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def _matches(value, tp) -> bool:
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if dataclasses.is_dataclass(tp) or tp is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is type(None):
        return value is None
    return isinstance(value, tp)


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _declared(key: str):
    """The declared type of a dotted key, or None."""
    parts = key.split(".")
    cls = GROUPS.get(parts[0])
    tp: Any = cls
    for part in parts[1:]:
        if not dataclasses.is_dataclass(tp):
            return None
        tp = _field_types(tp).get(part)
        if tp is None:
            return None
    return tp if len(parts) > 1 else None


def _inferred(value) -> Any:
    if value is None:
        return Any
    if isinstance(value, bool):
        return bool
    if isinstance(value, float):
        return float
    if isinstance(value, int):
        return int
    for t in (str, list, dict):
        if isinstance(value, t):
            return t
    return Any


def _plain(node) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


def _value(cfg: DictConfig, key: str):
    try:
        return True, _plain(OmegaConf.select(cfg, key, throw_on_missing=False))
    except Exception:  # an interpolation that cannot resolve yet (env var, runtime key): not ours to judge
        return False, None


def _error(key: str, value, tp) -> UserError:
    shown = "null" if value is None else repr(value)
    return UserError(f"{key} must be {_describe(tp)}, not {shown}; set it as {key}=<value> on the command line "
                     "or in the experiment file.")


def check_config(cfg: DictConfig, overridden: Sequence[str] = (), defaults: DictConfig | None = None) -> None:
    """Refuse a composed config whose declared keys, or overridden keys, have the wrong type."""
    for group, cls in GROUPS.items():
        node = cfg.get(group)
        if not isinstance(node, DictConfig):
            continue
        for name, tp in _field_types(cls).items():
            if name not in node:
                continue
            key = f"{group}.{name}"
            ok, value = _value(cfg, key)
            if ok and not _matches(value, tp):
                raise _error(key, value, tp)
            if ok and dataclasses.is_dataclass(tp) and isinstance(value, dict):
                for sub, stp in _field_types(tp).items():
                    if sub in value and not _matches(value[sub], stp):
                        raise _error(f"{key}.{sub}", value[sub], stp)
    for key in overridden:
        if "." not in key or _declared(key) is not None:
            continue
        ok, value = _value(cfg, key)
        if not ok or defaults is None:
            continue
        ok_b, default = _value(defaults, key)
        tp = _inferred(default) if ok_b else Any
        if tp is float:
            tp = Union[int, float]
        if not _matches(value, tp):
            raise _error(key, value, tp)


def load_group(node: DictConfig, cls: type, prefix: str = ""):
    """A typed object of one config group (keys the dataclass does not declare are dropped).

    `prefix` names the group in messages (e.g. "select")."""
    data = _plain(node) or {}
    out = {}
    where = f"{prefix}." if prefix else ""
    for name, tp in _field_types(cls).items():
        if name not in data:
            raise UserError(f"the config lacks {where}{name}; add it to the group's YAML file (configs/).")
        value = data[name]
        if not _matches(value, tp):
            raise _error(f"{where}{name}", value, tp)
        out[name] = load_group(OmegaConf.create(value), tp, f"{where}{name}") if dataclasses.is_dataclass(tp) else value
    return cls(**out)
