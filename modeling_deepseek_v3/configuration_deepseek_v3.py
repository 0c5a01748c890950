"""DeepSeek-V3 configuration.

Accepts every key of the published `config.json` (DeepSeek-V3, V3-0324, R1 share it: `rope_scaling`, `rope_theta`,
`scoring_func`, `topk_method`, `num_nextn_predict_layers`, `quantization_config`, ...) and the configs written by
transformers' built-in DeepseekV3 (`rope_parameters`, `rope_interleave`, `num_mtp_layers`).
"""


import math

from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters
from transformers.utils import logging

from .rope import supported_rope_types

logger = logging.get_logger(__name__)

SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "group_limited_greedy", "greedy")


class DeepseekV3Config(PreTrainedConfig):
    r"""
    Configuration of a DeepSeek-V3 model. Defaults are those of the published 671B checkpoint.

    Architecture keys (names as in the published `config.json`):
        q_lora_rank / kv_lora_rank: ranks of the MLA query / key-value compressions (`q_lora_rank=None` means a
            full-rank `q_proj`). The KV cache holds `kv_lora_rank + qk_rope_head_dim` values per token and layer.
        qk_nope_head_dim / qk_rope_head_dim / v_head_dim: per-head query-key dims without and with rotary embedding
            (decoupled RoPE), and the value head dim.
        n_routed_experts / n_shared_experts / num_experts_per_tok / moe_intermediate_size: the DeepSeekMoE layer.
        n_group / topk_group: node-limited routing: experts are split into `n_group` groups, each token may only
            use experts of its `topk_group` best groups (a group's score is the sum of its top-2 expert scores).
        scoring_func ("sigmoid" or "softmax"), topk_method ("noaux_tc" for V3's bias-corrected selection,
            "group_limited_greedy" / "greedy" for V2-style routing), norm_topk_prob, routed_scaling_factor.
        first_k_dense_replace: the first `first_k_dense_replace` layers use a dense MLP, all later ones are MoE
            (`moe_layer_freq` is kept from the published config but, as in DeepSeek's reference, not read).
        num_nextn_predict_layers: number of Multi-Token Prediction modules (stored as extra layers after
            `num_hidden_layers`).

    Inference keys (ours):
        mla_absorb: "auto" (absorbed MLA for decode steps over a cache, expanded path for prefill/training), "on" or
            "off" to force one path (both give the same results; see `attention.py`).

    Training keys (ours):
        mtp_loss_weight: weight lambda of the mean MTP loss added to the main loss (0.3 as in the paper's first
            phase; 0 disables the MTP forward entirely).
        seq_aux_loss_alpha: alpha of the complementary sequence-wise balance loss (paper eq. 17-20; 0 = off).
            The published configs carry `aux_loss_alpha=0.001` and `seq_aux=true` (pre-training values); they are
            kept for reference only, so fine-tuning a published checkpoint adds no balance loss unless asked.
    """

    model_type = "deepseek_v3"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "num_local_experts": "n_routed_experts",
        "num_mtp_layers": "num_nextn_predict_layers",
    }
    # Tensor parallelism (`from_pretrained(..., tp_plan="auto")`): MLA splits its heads (q_b_proj / q_proj and
    # kv_b_proj by output rows, o_proj by input columns; the low-rank q_a_proj and the shared latent stay
    # replicated, the rope key's gradient is summed by `mla_kv_a_proj`), the dense MLP, the shared experts and each
    # routed expert split their intermediate dim. transformers adds `embed_tokens` and, from `_tp_plan`, `lm_head`.
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.q_b_proj": "colwise",
        "layers.*.self_attn.kv_a_proj_with_mqa": "mla_kv_a_proj",
        "layers.*.self_attn.kv_b_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.experts.gate_up_proj": "packed_colwise",
        "layers.*.mlp.experts.down_proj": "rowwise",
        "layers.*.mlp.experts": "moe_tp_experts",
        "layers.*.mlp.shared_experts.gate_proj": "colwise",
        "layers.*.mlp.shared_experts.up_proj": "colwise",
        "layers.*.mlp.shared_experts.down_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    # Expert parallelism (`DistributedConfig(ep_size=...)`): whole routed experts per rank (expert dim sharded),
    # tokens dispatched to their expert's rank by transformers' EP implementation; the router, the shared experts
    # and attention stay replicated (or follow the TP plan).
    base_model_ep_plan = {
        "layers.*.mlp.experts.gate_up_proj": "grouped_gemm",
        "layers.*.mlp.experts.down_proj": "grouped_gemm",
        "layers.*.mlp.experts": "ep_dispatch_experts",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_nextn_predict_layers: int = 1
    num_attention_heads: int = 128
    num_key_value_heads: int | None = 128
    n_shared_experts: int | None = 1
    n_routed_experts: int | None = 256
    ep_size: int = 1
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    topk_method: str = "noaux_tc"
    n_group: int | None = 8
    topk_group: int | None = 4
    num_experts_per_tok: int | None = 8
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    seq_aux_loss_alpha: float | None = None
    mtp_loss_weight: float = 0.3
    hidden_act: str = "silu"
    max_position_embeddings: int = 163840
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pretraining_tp: int | None = 1
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    rope_interleave: bool = True
    attention_bias: bool = False
    attention_dropout: float | int = 0.0
    output_router_logits: bool = False
    quantization_config: dict | None = None
    mla_absorb: str = "auto"

    def __post_init__(self, **kwargs):
        # Published configs say `rope_scaling: {"type": "yarn", ...}` + `rope_theta`; the base class folds both into
        # `rope_parameters` (the transformers-5 format) and we default to plain RoPE with theta 10000.
        if self.rope_parameters is None and kwargs.get("rope_theta") is None:
            kwargs["rope_theta"] = 10000.0
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        # Keys the built-in attention interface and generation utilities read.
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        self.head_dim = self.qk_rope_head_dim
        self.validate_architecture()

    @property
    def effective_seq_aux_loss_alpha(self) -> float:
        """alpha of the sequence-wise balance loss actually used in training (0 = off)."""
        if self.seq_aux_loss_alpha is not None:
            return float(self.seq_aux_loss_alpha)
        return 0.0

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer `layer_idx` uses DeepSeekMoE (MTP layers use the rule of the last layer index):
        every layer from `first_k_dense_replace` on, as DeepSeek's reference and transformers' built-in class
        (`moe_layer_freq` is not read; see `validate_architecture`)."""
        return self.n_routed_experts is not None and layer_idx >= self.first_k_dense_replace

    def validate_architecture(self):
        """Raise a `ValueError` naming the key, its value and the constraint it breaks, for configs that cannot run
        (or would run into NaN / a failure at forward time). Configs that transformers' built-in class runs although
        they look odd (e.g. more experts per token than the selected groups hold) load, with a warning naming the
        key and what is computed."""

        def fail(key, value, constraint):
            raise ValueError(f"DeepseekV3Config: `{key}`={value!r} is invalid: {constraint}")

        def check_int(key, value, minimum, constraint):
            if isinstance(value, str):
                fail(key, value, f"must be an integer, not the string {value!r} (write it without quotes in the JSON)")
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                fail(key, value, constraint)

        positive = [
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "kv_lora_rank",
            "qk_rope_head_dim",
            "v_head_dim",
            "qk_nope_head_dim",
            "moe_layer_freq",
        ]
        for key in positive:
            check_int(key, getattr(self, key), 1, "must be a positive integer")
        if self.q_lora_rank is not None:
            check_int("q_lora_rank", self.q_lora_rank, 1, "must be a positive integer, or null for a full-rank q_proj")
        for key in ("num_nextn_predict_layers", "first_k_dense_replace"):
            check_int(key, getattr(self, key), 0, "must be >= 0")
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", self.qk_rope_head_dim, "must be even (rotary dims come in pairs)")
        self._validate_numbers()
        self._validate_rope()
        if self.hidden_act not in ACT2FN:
            fail("hidden_act", self.hidden_act, f"must be an activation transformers knows, e.g. 'silu' ({sorted(ACT2FN)})")
        if self.mla_absorb not in ("auto", "on", "off", True, False):
            fail("mla_absorb", self.mla_absorb, "must be 'auto', 'on' or 'off'")
        if self.pad_token_id is not None:
            check_int("pad_token_id", self.pad_token_id, 0, "must be a token id >= 0, or null")
            if self.pad_token_id >= self.vocab_size:
                fail("pad_token_id", self.pad_token_id, f"must be < vocab_size={self.vocab_size}")
        if self.first_k_dense_replace >= self.num_hidden_layers and self.n_routed_experts is not None:
            logger.warning_once(
                f"DeepseekV3Config: `first_k_dense_replace`={self.first_k_dense_replace} >= num_hidden_layers="
                f"{self.num_hidden_layers}: every layer (and the MTP modules) uses a dense MLP, no routed experts"
            )
        if self.moe_layer_freq != 1:
            logger.warning_once(
                f"DeepseekV3Config: `moe_layer_freq`={self.moe_layer_freq} is ignored: as in DeepSeek-V3's reference "
                f"and transformers' built-in class, every layer from first_k_dense_replace on is a MoE layer"
            )
        if self.scoring_func not in SCORING_FUNCS:
            fail("scoring_func", self.scoring_func, f"must be one of {SCORING_FUNCS}")
        if self.topk_method not in TOPK_METHODS:
            fail("topk_method", self.topk_method, f"must be one of {TOPK_METHODS}")
        if self.n_routed_experts is None:
            return
        for key in ("n_routed_experts", "moe_intermediate_size", "num_experts_per_tok"):
            check_int(key, getattr(self, key), 1, "must be a positive integer")
        if self.n_shared_experts is not None:
            check_int("n_shared_experts", self.n_shared_experts, 0, "must be >= 0")
        n_group = 1 if self.n_group is None else self.n_group
        topk_group = 1 if self.topk_group is None else self.topk_group
        check_int("n_group", n_group, 1, "must be a positive integer (or null for a single group)")
        check_int("topk_group", topk_group, 1, "must be a positive integer: the number of groups a token may use")
        if self.n_routed_experts % n_group:
            fail(
                "n_routed_experts",
                self.n_routed_experts,
                f"must be divisible by n_group={n_group} (experts are split into equal groups)",
            )
        if not 0 < topk_group <= n_group:
            fail("topk_group", self.topk_group, f"must be in [1, n_group={n_group}]")
        experts_per_group = self.n_routed_experts // n_group
        if self.topk_method == "noaux_tc" and experts_per_group < 2 and n_group > 1:
            fail(
                "n_group",
                n_group,
                f"leaves {experts_per_group} expert per group; group scores sum the top-2 experts of a group",
            )
        if self.num_experts_per_tok > self.n_routed_experts:
            fail("num_experts_per_tok", self.num_experts_per_tok, f"must be <= n_routed_experts={self.n_routed_experts}")
        selectable = topk_group * experts_per_group if self.topk_method != "greedy" else self.n_routed_experts
        if self.num_experts_per_tok > selectable:
            logger.warning_once(
                f"DeepseekV3Config: `num_experts_per_tok`={self.num_experts_per_tok} > the {selectable} experts of the "
                f"topk_group={topk_group} selected groups ({experts_per_group} experts per group): each token also "
                f"gets experts of unselected groups (picked among equal -inf scores), as transformers' built-in class "
                f"computes it"
            )

    def _validate_numbers(self):
        """Float keys: real numbers (not strings), finite, in range."""

        def number(key, value, minimum=None, strict=False):
            if isinstance(value, str) or isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(
                    f"DeepseekV3Config: `{key}`={value!r} is invalid: must be a number"
                    + (" (write it without quotes in the JSON)" if isinstance(value, str) else "")
                )
            if not math.isfinite(value):
                raise ValueError(f"DeepseekV3Config: `{key}`={value!r} is invalid: must be finite")
            if minimum is not None and (value <= minimum if strict else value < minimum):
                relation = ">" if strict else ">="
                raise ValueError(f"DeepseekV3Config: `{key}`={value!r} is invalid: must be {relation} {minimum}")

        number("rms_norm_eps", self.rms_norm_eps, 0, strict=True)
        number("routed_scaling_factor", self.routed_scaling_factor, 0, strict=True)
        number("initializer_range", self.initializer_range, 0)
        number("mtp_loss_weight", self.mtp_loss_weight, 0)
        if self.seq_aux_loss_alpha is not None:
            number("seq_aux_loss_alpha", self.seq_aux_loss_alpha, 0)
        number("attention_dropout", self.attention_dropout, 0)

    def _validate_rope(self):
        params = self.rope_parameters or {}
        kind = params.get("rope_type", "default")
        if kind not in supported_rope_types():
            raise ValueError(
                f"DeepseekV3Config: `rope_parameters.rope_type`={kind!r} is invalid: must be one of "
                f"{supported_rope_types()} (DeepSeek-V3 uses 'yarn')"
            )
        theta = params.get("rope_theta", 10000.0)
        if isinstance(theta, str) or not isinstance(theta, (int, float)) or not theta > 0:
            raise ValueError(f"DeepseekV3Config: `rope_parameters.rope_theta`={theta!r} is invalid: must be a number > 0")
        if kind != "default":
            factor = params.get("factor")
            if kind != "longrope" and factor is None and kind != "llama3":
                raise ValueError(f"DeepseekV3Config: `rope_parameters.factor` is missing: rope_type {kind!r} needs it")
            if factor is not None and (
                isinstance(factor, str) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 0
            ):
                raise ValueError(
                    f"DeepseekV3Config: `rope_parameters.factor`={factor!r} is invalid: must be a number > 0 (the "
                    f"context extension ratio, 40 for DeepSeek-V3)"
                )


__all__ = ["DeepseekV3Config"]
