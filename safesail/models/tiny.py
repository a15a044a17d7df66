"""A tiny random-weight model of a real architecture, for tests and the smoke experiment.

The tokenizer is a byte-level BPE (so every language tokenises) trained on the
bundled corpus with ChatML special tokens and chat template, like the real
models'. Built deterministically from the config and saved once as an ordinary
model folder in the cache directory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from safesail.rundir import fingerprint

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
DATA_DIR = Path(__file__).resolve().parents[2] / "data"

_FALLBACK_TEXT = (
    "The quick brown fox jumps over the lazy dog. How do I bake bread at home? "
    "What are the causes of the French Revolution? 请解释一下光合作用。 भारत की राजधानी क्या है? "
    "Numbers 0123456789 and punctuation: , . ; : ! ? ( ) [ ] { } \" ' - _ / \\ @ # $ % ^ & * + = < > ~"
)


def _training_texts() -> list[str]:
    texts: list[str] = [_FALLBACK_TEXT]
    corpus_dir = DATA_DIR / "corpus"
    if corpus_dir.is_dir():
        for path in sorted(corpus_dir.glob("*.jsonl")):
            for line in path.read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                rec = json.loads(line)
                if "text" in rec:
                    texts.append(str(rec["text"]))
                for m in rec.get("messages", []) or []:
                    texts.append(str(m.get("content", "")))
    return texts


def build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(_training_texts(), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=None, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token=None,
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHATML_TEMPLATE
    return tok


def build_tiny_model(cfg: DictConfig, vocab_size: int):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = str(cfg.get("architecture", "llama"))
    config = AutoConfig.for_model(
        arch, vocab_size=vocab_size, hidden_size=int(cfg.hidden_size),
        intermediate_size=int(cfg.intermediate_size), num_hidden_layers=int(cfg.num_layers),
        num_attention_heads=int(cfg.num_heads), num_key_value_heads=int(cfg.num_kv_heads),
        max_position_embeddings=int(cfg.get("max_length", 512)), tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=2, pad_token_id=0)
    config.architectures = {"llama": ["LlamaForCausalLM"], "qwen2": ["Qwen2ForCausalLM"],
                            "mistral": ["MistralForCausalLM"]}.get(arch)
    torch.manual_seed(int(cfg.get("seed", 0)))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init with a larger std so that activations are not all tiny.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    return model


def ensure_tiny_model(cfg: DictConfig, cache_dir: Path) -> Path:
    from filelock import FileLock

    keys = ["architecture", "hidden_size", "intermediate_size", "num_layers", "num_heads",
            "num_kv_heads", "vocab_size", "seed", "max_length"]
    spec = {k: OmegaConf.select(cfg, k) for k in keys}
    spec["corpus"] = fingerprint(_training_texts())
    out = Path(cache_dir) / "models" / f"tiny-{fingerprint(spec)}"
    if (out / ".complete").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / ".complete").exists():
            return out
        tok = build_tokenizer(int(cfg.vocab_size))
        model = build_tiny_model(cfg, len(tok))
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tiny-"))
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / ".complete").write_text(json.dumps(spec))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    return out
