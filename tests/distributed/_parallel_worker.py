"""Tensor / expert parallelism worker for test_engines.py, run by `torchrun --nproc_per_node 2` (gloo, CPU).

Loads INIT sharded by transformers' machinery -- `from_pretrained(..., tp_plan="auto")` (mode `tp`) or
`distributed_config=DistributedConfig(tp_size=2, ep_size=2)` (mode `tp_ep`: dense layers tensor parallel, whole
routed experts per rank) -- and the same checkpoint unsharded, then on one batch (both ranks hold the same batch, as TP ranks do):

- eval forward: logits of the sharded and the unsharded model; greedy generation (expanded and absorbed MLA decode);
- one training forward + backward with labels (main + MTP + balance loss): every parameter's gradient, gathered;
- one aux-loss-free bias update (`update_expert_bias`, counts all-reduced over the ranks);
- `save_pretrained` of the sharded model into OUT/saved (rank 0 writes the published layout).

Writes OUT/rank{r}.pt with the maximum differences, the biases and the placements of a few parameters.
"""

import os
import sys

import torch
import torch.distributed as dist

SHARDED = ("model.layers.1.self_attn.q_b_proj.weight", "model.layers.1.mlp.experts.gate_up_proj")


def load(path: str, mode: str | None):
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    import deepseek_v3  # noqa: F401  (registers the classes)

    if mode is None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if mode == "tp":
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, tp_plan="auto")
    if mode != "tp_ep":
        raise ValueError(f"unknown mode {mode!r}: use tp or tp_ep")
    config = DistributedConfig(tp_size=2, ep_size=2)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, distributed_config=config)


def full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def main(init: str, out: str, mode: str) -> None:
    torch.set_num_threads(1)
    from deepseek_v3.trainers.balancing import find_routers, update_expert_bias

    sharded = load(init, mode)
    reference = load(init, None)
    if dist.get_world_size() != 2:
        raise SystemExit(f"expected 2 processes, got {dist.get_world_size()}")
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(3)
    input_ids = torch.randint(3, sharded.config.vocab_size, (2, 24), generator=gen)
    labels = input_ids.clone()
    labels[:, :5] = -100

    result = {"world": dist.get_world_size(), "mode": mode}
    sharded.eval(), reference.eval()
    with torch.no_grad():
        logits = full(sharded(input_ids=input_ids).logits)
        result["logits_diff"] = (logits - reference(input_ids=input_ids).logits).abs().max().item()
        # greedy decoding over the cache, expanded and absorbed MLA (the absorbed path attends over the latent with
        # this rank's heads of kv_b_proj); experts at inference go through transformers' EP all-reduce
        result["generate_equal"] = {}
        for absorb in ("off", "on"):
            sharded.config.mla_absorb = reference.config.mla_absorb = absorb
            prompt = input_ids[:1, :8]
            tokens = [model.generate(prompt, max_new_tokens=6, do_sample=False) for model in (sharded, reference)]
            result["generate_equal"][absorb] = torch.equal(*tokens)
        sharded.config.mla_absorb = reference.config.mla_absorb = "auto"

    sharded.train(), reference.train()
    for model in (sharded, reference):
        model(input_ids=input_ids, labels=labels, use_cache=False).loss.backward()
    reference_grads = {n: p.grad for n, p in reference.named_parameters()}
    diffs = {n: (full(p.grad) - reference_grads[n]).abs().max().item() for n, p in sharded.named_parameters()}
    result["grad_diff"] = max(diffs.values())
    result["grad_worst"] = max(diffs, key=diffs.get)
    result["grad_scale"] = max(g.abs().max().item() for g in reference_grads.values())
    params = dict(sharded.named_parameters())
    result["placements"] = {n: str(getattr(params[n], "placements", "full")) for n in SHARDED if n in params}

    # aux-loss-free balancing: the counts of the training forward, all-reduced over the ranks; the unsharded model
    # applies the rule to its own (single-process) counts of the same batch
    update_expert_bias(sharded, gamma=0.01)
    reference_load = torch.stack([info.router.tokens_per_expert.clone() for info in find_routers(reference)])
    update_expert_bias(reference, gamma=0.01)
    result["reference_load"] = reference_load
    biases = torch.stack([info.router.e_score_correction_bias.detach().clone() for info in find_routers(sharded)])
    reference_biases = torch.stack([info.router.e_score_correction_bias.clone() for info in find_routers(reference)])
    result["biases"] = biases
    result["bias_diff"] = (biases - reference_biases).abs().max().item()

    sharded.save_pretrained(os.path.join(out, "saved"))
    dist.barrier()
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
