"""Reference directions at a hook point: the difference in means between concept and neutral queries.

For a domain's concept-contrastive pairs, the mean activation over the (non-special) tokens of
the concept queries minus that over their neutral twins, both chat-templated like the model
sees them. The verify stage rescales it to the norm of the latent steering it compares with.
"""

from __future__ import annotations

import torch

from safesail.hooks import HookPoint, capture_activations, special_token_mask


@torch.no_grad()
def mean_activations(lm, prompts: list[list[int]], hooks: list[HookPoint]) -> dict[str, torch.Tensor]:
    """{hook name: [d] mean activation over the non-special tokens of `prompts`} for several hooks
    from ONE pass per prompt (to the deepest hook); each prompt runs alone, unpadded."""
    points = sorted(set(hooks), key=lambda p: p.layer)
    total: dict[str, torch.Tensor | None] = {p.name: None for p in points}
    count = 0
    for p in prompts:
        ids = torch.tensor([p], device=lm.device)
        acts = capture_activations(lm.model, ids, None, points)
        keep = ~special_token_mask(lm.tokenizer, ids)[0]
        for pt in points:
            s = acts[pt.name][0].float()[keep].sum(0).cpu()
            total[pt.name] = s if total[pt.name] is None else total[pt.name] + s
        count += int(keep.sum())
    return {k: v / max(count, 1) for k, v in total.items()}


def mean_activation(lm, prompts: list[list[int]], hp: HookPoint) -> torch.Tensor:
    return mean_activations(lm, prompts, [hp])[hp.name]


def diffs_in_means(lm, hooks: list[HookPoint], concept: list[list[int]],
                   neutral: list[list[int]]) -> dict[str, torch.Tensor]:
    """{hook name: [d] mean activation on concept prompts minus on neutral prompts} for several
    hooks of one domain (the verify stage's reference directions), one pass per prompt."""
    c, n = mean_activations(lm, concept, hooks), mean_activations(lm, neutral, hooks)
    return {hp.name: c[hp.name] - n[hp.name] for hp in hooks}


def diff_in_means(lm, hp: HookPoint, concept: list[list[int]], neutral: list[list[int]]) -> torch.Tensor:
    """[d]: mean activation at `hp` on concept prompts minus on neutral prompts."""
    return diffs_in_means(lm, [hp], concept, neutral)[hp.name]
