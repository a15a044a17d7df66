"""Reference directions at a hook point: the difference in means between concept and neutral queries.

For a domain's concept-contrastive pairs, the mean activation over the (non-special) tokens of
the concept queries minus that over their neutral twins, both chat-templated like the model
sees them. The verify stage rescales it to the norm of the latent steering it compares with.
"""

from __future__ import annotations

import torch

from safesail.hooks import HookPoint, capture_activations, special_token_mask


@torch.no_grad()
def mean_activation(lm, prompts: list[list[int]], hp: HookPoint) -> torch.Tensor:
    total, count = None, 0
    for p in prompts:
        ids = torch.tensor([p], device=lm.device)
        x = capture_activations(lm.model, ids, None, [hp])[hp.name][0].float()
        keep = ~special_token_mask(lm.tokenizer, ids)[0]
        s = x[keep].sum(0).cpu()
        total = s if total is None else total + s
        count += int(keep.sum())
    return total / max(count, 1)


def diff_in_means(lm, hp: HookPoint, concept: list[list[int]], neutral: list[list[int]]) -> torch.Tensor:
    """[d]: mean activation at `hp` on concept prompts minus on neutral prompts."""
    return mean_activation(lm, concept, hp) - mean_activation(lm, neutral, hp)
