"""`deepseek-v3 info CONFIG_OR_NAME`: parameter counts, weight memory and KV-cache size, computed on the meta
device (no memory is allocated, so the 671B config is instant).

Counting conventions (matching DeepSeek's published weight notes):
- main model: embedding + the `num_hidden_layers` decoder layers + final norm + output head (671.0B for V3/R1);
- MTP: the `num_nextn_predict_layers` extra modules, excluding the embedding and head they share with the main
  model (11.5B unique for V3/R1);
- activated per token: everything except the routed experts a token does not use (num_experts_per_tok of
  n_routed_experts per MoE layer), with the whole embedding matrix and output head counted. DeepSeek quotes
  36.7B: the difference is (almost exactly) the embedding matrix, which a token only reads one row of.
"""

import argparse
import json

import torch

from .configs import load_config
from .configuration_deepseek_v3 import DeepseekV3Config

BF16_BYTES = 2
FP8_BLOCK = 128


def _is_fp8_quantized(name: str, param: torch.Tensor) -> bool:
    """Weights the published FP8 checkpoints store as e4m3: the Linear / expert weights inside decoder blocks.
    Embeddings, the output head, norms, the MoE gate and the MTP eh_proj stay BF16."""
    if not name.startswith("model.layers.") or param.dim() < 2:
        return False
    return not (name.endswith("mlp.gate.weight") or ".eh_proj." in name)


def _fp8_bytes(param: torch.Tensor) -> int:
    """e4m3 values + one fp32 `weight_scale_inv` per 128x128 block (per expert for 3-D expert tensors)."""
    *lead, rows, cols = param.shape
    blocks = -(-rows // FP8_BLOCK) * -(-cols // FP8_BLOCK)
    experts = 1
    for size in lead:
        experts *= size
    return param.numel() + 4 * blocks * experts


def parameter_report(config: DeepseekV3Config) -> dict:
    from .modeling_deepseek_v3 import DeepseekV3ForCausalLM

    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config)
    num_main_layers = config.num_hidden_layers
    embed = model.model.embed_tokens.weight.numel()
    head = model.lm_head.weight.numel()

    main = mtp = inactive_experts = 0
    bf16_bytes = fp8_bytes = 0
    for name, param in model.named_parameters():
        n = param.numel()
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else -1
        is_mtp = layer >= num_main_layers
        if is_mtp:
            mtp += n
        else:
            main += n
            if name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj"):
                unused = config.n_routed_experts - config.num_experts_per_tok
                inactive_experts += n // config.n_routed_experts * unused
        bf16_bytes += n * BF16_BYTES
        fp8_bytes += _fp8_bytes(param) if _is_fp8_quantized(name, param) else n * BF16_BYTES
    activated = main - inactive_experts

    latent_values = config.kv_lora_rank + config.qk_rope_head_dim
    mla_bytes_per_token_layer = latent_values * BF16_BYTES
    mha_bytes_per_token_layer = (
        config.num_attention_heads * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim) * BF16_BYTES
    )
    return {
        "main_params": main,
        "activated_params_per_token": activated,
        "activated_params_per_token_without_embedding": activated - embed,
        "mtp_params_unique": mtp,
        "mtp_params_with_shared_embedding_and_head": mtp + embed + head,
        "total_params_with_mtp": main + mtp,
        "embedding_params": embed,
        "lm_head_params": head,
        "weight_bytes_bf16": bf16_bytes,
        "weight_bytes_fp8": fp8_bytes,
        "kv_cache_bytes_per_token_per_layer_mla": mla_bytes_per_token_layer,
        "kv_cache_bytes_per_token_mla": mla_bytes_per_token_layer * num_main_layers,
        "kv_cache_bytes_per_token_per_layer_mha": mha_bytes_per_token_layer,
        "kv_cache_bytes_per_token_mha": mha_bytes_per_token_layer * num_main_layers,
    }


def _human(n: float, unit: str = "") -> str:
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.2f} MiB"


def format_report(name: str, report: dict) -> str:
    r = report
    lines = [
        f"DeepSeek-V3 config: {name}",
        f"  main model parameters         {_human(r['main_params'])} ({r['main_params']:,})",
        f"  activated per token           {_human(r['activated_params_per_token'])} "
        f"(whole embedding and head counted; {_human(r['activated_params_per_token_without_embedding'])} "
        "without the embedding matrix, of which a token reads one row -- DeepSeek's published 36.7B for V3 "
        "counts it that way)",
        f"  MTP modules, unique           {_human(r['mtp_params_unique'])} "
        f"({_human(r['mtp_params_with_shared_embedding_and_head'])} with the shared embedding and head)",
        f"  total with MTP                {_human(r['total_params_with_mtp'])}",
        f"  weights in BF16               {_gib(r['weight_bytes_bf16'])}",
        f"  weights in FP8 (e4m3 + 128x128 block scales; embeddings, head, norms, gates in BF16)"
        f"  {_gib(r['weight_bytes_fp8'])}",
        f"  KV cache per token (MLA latent, BF16)   {r['kv_cache_bytes_per_token_per_layer_mla']:,} B/layer, "
        f"{r['kv_cache_bytes_per_token_mla'] / 1024:,.1f} KiB over all layers",
        f"  KV cache per token (naive MHA, BF16)    {r['kv_cache_bytes_per_token_per_layer_mha']:,} B/layer, "
        f"{r['kv_cache_bytes_per_token_mha'] / 1024:,.1f} KiB over all layers "
        f"({r['kv_cache_bytes_per_token_mha'] / r['kv_cache_bytes_per_token_mla']:.1f}x the latent cache)",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    report = parameter_report(config)
    print(json.dumps(report) if args.json else format_report(args.config, report))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("info", help="parameter counts, weight memory and KV-cache size of a config")
    parser.add_argument("config", help="shipped config name (deepseek-v3, tiny, small), config.json path or hub id")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    parser.set_defaults(func=run)
