"""Shared helpers for the MoE balancing tests: a tiny model with a deliberately skewed router, data, Trainer runs."""

from __future__ import annotations

import torch

from deepseek_v3 import DeepseekV3ForCausalLM, load_config
from deepseek_v3.trainers.balancing import find_routers

VOCAB = 320
SKEWED_EXPERTS = (0, 2)  # one expert in each of two groups, so group-limited routing picks exactly these two


def tiny_model(seed: int = 0, **overrides) -> DeepseekV3ForCausalLM:
    torch.manual_seed(seed)
    return DeepseekV3ForCausalLM(load_config("tiny", **overrides))


@torch.no_grad()
def skew_router(
    model: DeepseekV3ForCausalLM,
    experts=SKEWED_EXPERTS,
    strength: float = 4.0,
    offset: float = 0.3,
    router_scale: float = 10.0,
    seed: int = 1,
) -> None:
    """Make every MoE layer send (almost) all tokens to `experts`.

    A shared offset (norm `offset`, the token embeddings have norm ~0.16) is added to every token embedding, so all
    router inputs share one direction m (the per-layer mean router input, measured on a probe batch); the router
    rows of `experts` get `strength * m / |m|^2`, i.e. a logit of about `strength` for every token. The router
    weights are first scaled by `router_scale` so tokens keep diverse preferences among the other experts (else
    all tokens look alike to the router and no bias can split them)."""
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(model.config.hidden_size, generator=gen)
    model.model.embed_tokens.weight += offset * direction / direction.norm()
    routers = find_routers(model)
    for info in routers:
        info.router.weight *= router_scale
    inputs: dict[int, torch.Tensor] = {}
    hooks = [
        info.router.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0].detach()))
        for i, info in enumerate(routers)
    ]
    was_training = model.training
    model.eval()
    probe = torch.randint(3, VOCAB, (4, 32), generator=gen)
    # Routers of later layers see the already-skewed earlier layers: skew them one at a time, in order.
    for i, info in enumerate(routers):
        model(input_ids=probe, return_mtp_logits=True)
        mean = inputs[i].float().mean(dim=0)
        for e in experts:
            info.router.weight[e] += strength * mean / mean.norm() ** 2
    for hook in hooks:
        hook.remove()
    model.train(was_training)


def token_dataset(num_samples: int, seq_len: int = 32, seed: int = 123) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (num_samples, seq_len), generator=gen)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]
