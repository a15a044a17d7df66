"""The judge's engine: int8 weights for the local judge's linear layers (`verify.judge_quantize: int8`).

The judge (Qwen2.5-Coder-1.5B, bf16, in process) is the verify stage's critical path on a 2-core CPU
(BENCHMARKS.md, issue 15, sessions 4-5). Its work is prefill of the answers (one forward, no decoding),
nearly all of it in the decoder's linear layers; torch's dynamic int8 linear (weights int8 per output channel,
activations quantized per batch, fbgemm) did an MLP-sized product of 100 tokens in ~0.58x the CPU time
of bf16 at one thread on the dev box. `quantize_judge` swaps every linear layer of the judge's decoder
(not the unembedding, which the engine reads row by row for the yes/no candidates and the normaliser)
for that int8 version, clears the engine's prefix cache (entries computed before would mix bf16 and int8
keys/values) and marks the client's cache identity (`quantize: int8`), so its replies never mix with the
bf16 judge's in the response cache. The model is changed in place: the stage drops the process's shared
engines when it ends (`release`), so nothing later in the process uses the quantized model by mistake.

A cheaper judge must judge the same way: see BENCHMARKS.md (issue 15, session 5) for its validation on the
hand-made pairs and its agreement with the bf16 judge on the demo's answers.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

MODES = ("none", "int8")


class Int8Linear(nn.Module):
    """A linear layer with dynamic int8 weights (one scale per output channel); takes and returns the model's
    dtype (bf16)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        f = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
        with torch.no_grad():
            f.weight.copy_(linear.weight.float())
            if linear.bias is not None:
                f.bias.copy_(linear.bias.float())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # torch's deprecation note on quantized tensors
            self.q = quantize_dynamic(nn.Sequential(f), {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)[0]
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(x.float()).to(x.dtype)


def quantize_module(root: nn.Module, skip: set[int] = frozenset()) -> int:
    """Replace every nn.Linear under `root` (except those whose id is in `skip`) by `Int8Linear`; how many."""
    n = 0
    for name, child in list(root.named_children()):
        if isinstance(child, nn.Linear) and id(child) not in skip:
            setattr(root, name, Int8Linear(child))
            n += 1
        else:
            n += quantize_module(child, skip)
    return n


def quantize_judge(client, mode: str | None) -> int:
    """Give the judge's local back end int8 linear layers (`mode` "int8"); "none"/None leaves it. Returns the
    number of layers swapped (0 for a back end without a local engine, or a model already quantized)."""
    if mode in (None, "none"):
        return 0
    from safesail.interpret.clients.base import client_with

    local = client_with(client, "engine")
    if local is None:
        return 0
    model = local.engine.model
    if getattr(model, "_safesail_int8", False):
        local._identity["quantize"] = "int8"
        return 0
    head = model.get_output_embeddings()
    n = quantize_module(model, skip={id(head)} if head is not None else set())
    model._safesail_int8 = True
    local.engine.cache.clear()
    local._identity["quantize"] = "int8"
    return n
