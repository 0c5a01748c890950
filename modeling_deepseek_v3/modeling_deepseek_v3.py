"""DeepSeek-V3 model classes: `DeepseekV3Model` (the decoder stack + MTP modules) and `DeepseekV3ForCausalLM`.

The paper's concepts live in their own modules: MLA in `attention.py`, routing/experts in `moe.py`, Multi-Token
Prediction in `mtp.py`, YaRN in `rope.py`. This file wires them together with the transformers conventions
(`PreTrainedModel`, caches, masks, outputs, `_init_weights`).
"""

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GenericForSequenceClassification, GenericForTokenClassification
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from ._compat import cache_kwargs, create_causal_mask, output_cache, resolve_cache
from .attention import DeepseekV3Attention
from .configuration_deepseek_v3 import DeepseekV3Config
from .decoder_layer import DeepseekV3DecoderLayer
from .layers import DeepseekV3RMSNorm
from .loss import LOSS_KWARGS, causal_lm_loss
from .moe import DeepseekV3Experts, DeepseekV3TopkRouter, RouterOutput
from .mtp import DeepseekV3MultiTokenPredictionLayer
from .rope import DeepseekV3RotaryEmbedding, compute_inv_freq

# Copies of the shared embedding / output head that the published checkpoints keep inside each MTP layer.
MTP_SHARED_COPIES = ("embed_tokens.weight", "shared_head.head.weight")


@dataclass
class DeepseekV3ModelOutput(MoeModelOutputWithPast):
    """`mtp_hidden_states`: per MTP depth k, shared_head.norm(h^k) [B, S, D] (position t predicts token t+k+1).
    `router_outputs`: per MoE layer (main layers first, then MTP blocks), the routing decisions.
    `router_logits` (with `output_router_logits`): per MoE layer of the main stack, the raw gate logits [B*S, E]."""

    mtp_hidden_states: tuple[torch.Tensor, ...] | None = None
    router_outputs: tuple[RouterOutput, ...] | None = None


@dataclass
class DeepseekV3CausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    """`loss` = main next-token loss + mtp_loss_weight * mtp_loss + aux_loss (sequence-wise balance loss).
    `main_loss` / `mtp_loss` are reported separately; `router_stats` [num_moe_layers, n_routed_experts] counts the
    tokens routed to each expert in this forward (when `output_router_stats=True`)."""

    main_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    mtp_logits: tuple[torch.Tensor, ...] | None = None
    router_stats: torch.Tensor | None = None


class DeepseekV3PreTrainedModel(PreTrainedModel):
    config: DeepseekV3Config
    config_class = DeepseekV3Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DeepseekV3DecoderLayer", "DeepseekV3MultiTokenPredictionLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_flash_attn = False  # value head dim != query head dim
    _supports_flex_attn = False
    _supports_attention_backend = True
    _can_compile_fullgraph = True  # static cache + torch.compile(fullgraph=True) decoding (tested)
    # transformers' output capturing (`output_hidden_states=True` or a list of layer indices, `output_attentions`)
    _can_record_outputs = {"hidden_states": DeepseekV3DecoderLayer, "attentions": DeepseekV3Attention}
    # the routed experts go through transformers' experts interface (`@use_experts_implementation` in moe.py, which
    # transformers' source check does not see from this module): eager / grouped_mm / batched_mm
    _can_set_experts_implementation_cached_value = True
    _keep_in_fp32_modules_strict = ["e_score_correction_bias"]
    _keys_to_ignore_on_load_unexpected = [r"model\.layers\.\d+\.(embed_tokens|shared_head\.head)\.weight"]

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, DeepseekV3TopkRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.e_score_correction_bias)
            init.zeros_(module.tokens_per_expert)
        elif isinstance(module, DeepseekV3Experts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, DeepseekV3RotaryEmbedding):
            inv_freq = compute_inv_freq(module.config)[0]
            init.copy_(module.inv_freq, inv_freq)
            init.copy_(module.original_inv_freq, inv_freq)
        else:  # nn.Linear (normal, zero bias), nn.Embedding (normal), RMSNorm (ones)
            super()._init_weights(module)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' `from_pretrained`, after refusing a local FP8 checkpoint in which a float8 tensor has no
        `weight_scale_inv` (transformers would load its raw e4m3 values as weights on CPU)."""
        from .kernels.fp8_checkpoint import check_fp8_checkpoint_before_load

        check_fp8_checkpoint_before_load(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def _ignore_layers_beyond_mtp(self):
        """A checkpoint may hold more MTP layers than this config uses (e.g. num_nextn_predict_layers=0)."""
        first_unused = self.config.num_hidden_layers + self.config.num_nextn_predict_layers
        unused = "|".join(str(i) for i in range(first_unused, first_unused + 8))
        patterns = set(self._keys_to_ignore_on_load_unexpected or ()) | {rf"model\.layers\.({unused})\."}
        self._keys_to_ignore_on_load_unexpected = patterns


class DeepseekV3Model(DeepseekV3PreTrainedModel):
    def __init__(self, config: DeepseekV3Config):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        num_main = config.num_hidden_layers
        self.layers = nn.ModuleList(
            [DeepseekV3DecoderLayer(config, i) for i in range(num_main)]
            + [DeepseekV3MultiTokenPredictionLayer(config, num_main + k) for k in range(config.num_nextn_predict_layers)]
        )
        self.norm = DeepseekV3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DeepseekV3RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self._ignore_layers_beyond_mtp()
        self.post_init()

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.layers[: self.config.num_hidden_layers]

    @property
    def mtp_layers(self) -> nn.ModuleList:
        return self.layers[self.config.num_hidden_layers :]

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        mtp_depth: int = 0,
        **kwargs,
    ) -> DeepseekV3ModelOutput:
        """`cache` (`past_key_values` is accepted too): the KV cache (latent + rope key per layer).
        `mtp_depth`: how many MTP modules to run after the main stack (0 = none, the inference default).
        `output_hidden_states` / `output_attentions` are captured by transformers' output-capturing hooks;
        `output_router_logits` (kwarg or config) returns the main stack's gate logits."""
        cache = resolve_cache(cache, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if mtp_depth > len(self.mtp_layers):
            raise ValueError(
                f"mtp_depth={mtp_depth} but the model has num_nextn_predict_layers={len(self.mtp_layers)}"
            )
        output_router_logits = kwargs.pop("output_router_logits", None)
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, seq = inputs_embeds.shape[:2]
        if seq == 0:
            raise ValueError("DeepseekV3Model: the input has 0 tokens (input_ids / inputs_embeds of sequence length 0)")
        past_seen = None
        if position_ids is None or (attention_mask is not None and not torch.compiler.is_compiling()):
            past_seen = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None and not torch.compiler.is_compiling():
            check_attention_mask(attention_mask, batch, seq, past_seen)
        if position_ids is None:
            position_ids = (torch.arange(seq, device=inputs_embeds.device) + past_seen).unsqueeze(0)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)

        hidden_states = inputs_embeds
        # tokens whose routing counts towards the expert load (balancing): the non-padding ones
        token_mask = None
        if self.training and attention_mask is not None and attention_mask.dim() == 2:  # [B, past + S]: last S
            token_mask = attention_mask[:, -seq:].reshape(-1).bool()
        router_outputs = []

        def record_routing(layer, routing: RouterOutput | None) -> None:
            """Keep a MoE layer's routing for the output and, in training, add it to its router's expert load
            (tokens with a non-finite gate logit, i.e. NaN activations, are not counted)."""
            if routing is not None:
                router_outputs.append(routing)
                if self.training:
                    finite = torch.isfinite(routing.router_logits).all(-1)
                    layer.mlp.gate.record_load(routing.topk_indices, finite if token_mask is None else finite & token_mask)

        for layer in self.decoder_layers:
            hidden_states, routing = layer(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=causal_mask,
                cache=cache,
                **kwargs,
            )
            record_routing(layer, routing)
        hidden_states = self.norm(hidden_states)
        router_logits = tuple(r.router_logits for r in router_outputs) if output_router_logits else None

        mtp_hidden_states = None
        if mtp_depth:
            mtp_hidden_states = []
            previous = hidden_states
            for k, layer in enumerate(self.mtp_layers[:mtp_depth], start=1):
                # Emb(token_{t+k}) at position t; the last k positions have no such token (masked in the loss).
                next_embeds = torch.roll(inputs_embeds, shifts=-k, dims=1)
                previous, routing = layer(
                    previous, next_embeds, position_embeddings=position_embeddings, attention_mask=causal_mask, **kwargs
                )
                record_routing(layer, routing)
                mtp_hidden_states.append(previous)
            mtp_hidden_states = tuple(mtp_hidden_states)

        return DeepseekV3ModelOutput(
            last_hidden_state=hidden_states,
            **cache_kwargs(cache),
            router_logits=router_logits,
            mtp_hidden_states=mtp_hidden_states,
            router_outputs=tuple(router_outputs),
        )


def check_attention_mask(attention_mask: torch.Tensor, batch: int, seq: int, past_seen: int) -> None:
    """A 2D padding mask must be [batch, past + seq] (a wrong length would silently shift every row's padding);
    a 4D mask (custom attention pattern) must be [batch or 1, 1 or heads, seq, keys]."""
    if attention_mask.dim() == 2:
        expected = (batch, past_seen + seq)
        if tuple(attention_mask.shape) != expected:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but the input needs {expected} "
                f"(batch, cached tokens {past_seen} + new tokens {seq}): pass the mask of the whole sequence so far"
            )
    elif attention_mask.dim() == 4:
        if attention_mask.shape[0] not in (1, batch) or attention_mask.shape[2] != seq:
            raise ValueError(
                f"4D attention_mask has shape {tuple(attention_mask.shape)}: expected [{batch} or 1, heads or 1, "
                f"{seq} (queries), keys]"
            )
    else:
        raise ValueError(f"attention_mask must be 2D [batch, length] or 4D, got shape {tuple(attention_mask.shape)}")


class DeepseekV3ForCausalLM(DeepseekV3PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}
    _fsdp_plan = {"lm_head": "keep_full_weight"}  # used twice per training forward (main + MTP heads)

    def __init__(self, config: DeepseekV3Config):
        super().__init__(config)
        self.model = DeepseekV3Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._ignore_layers_beyond_mtp()
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_router_stats: bool = False,
        return_mtp_logits: bool = False,
        **kwargs,
    ) -> DeepseekV3CausalLMOutputWithPast:
        """With `labels`: loss = main loss + mtp_loss_weight * mean_k(MTP loss at depth k) + balance loss (see
        `loss.py`; `num_items_in_batch`, `ignore_index` and `shift_labels` are honoured as transformers' causal-LM
        loss does). `cache` (`past_key_values` is accepted too): the KV cache. `return_mtp_logits=True` also returns
        each MTP depth's logits (the depth-k logits at position t predict token t+k+1). `return_dict=False` returns
        the tuple of the non-None fields in the standard order (loss, aux_loss, logits, cache, ...)."""
        cache = resolve_cache(cache, kwargs)
        loss_kwargs = {k: kwargs.pop(k) for k in LOSS_KWARGS if k in kwargs}
        num_mtp = self.config.num_nextn_predict_layers
        run_mtp = num_mtp > 0 and (return_mtp_logits or (labels is not None and self.config.mtp_loss_weight > 0))
        outputs: DeepseekV3ModelOutput = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            mtp_depth=num_mtp if run_mtp else 0,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        mtp_logits = tuple(self.lm_head(h) for h in outputs.mtp_hidden_states) if run_mtp else None
        balance_losses = [r.balance_loss for r in outputs.router_outputs if r.balance_loss is not None]
        aux_loss = torch.stack(balance_losses).sum() if balance_losses else None
        loss = main_loss = mtp_loss = None
        if labels is not None:
            loss, main_loss, mtp_loss = causal_lm_loss(
                self.loss_function,
                logits,
                labels,
                self.config.vocab_size,
                mtp_logits,
                self.config.mtp_loss_weight,
                aux_loss,
                **loss_kwargs,
            )

        router_stats = None
        if output_router_stats and outputs.router_outputs:
            num_experts = self.config.n_routed_experts
            router_stats = torch.stack(
                [torch.bincount(r.topk_indices.flatten(), minlength=num_experts) for r in outputs.router_outputs]
            )

        return DeepseekV3CausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            **cache_kwargs(output_cache(outputs)),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            main_loss=main_loss,
            mtp_loss=mtp_loss,
            mtp_logits=mtp_logits if return_mtp_logits else None,
            router_stats=router_stats,
        )

    def generate(self, inputs=None, generation_config=None, **kwargs):
        """`use_mtp=True` (kwarg or generation config) runs MTP self-speculative decoding with this model's own MTP
        module as the draft (see `speculative.py`; greedy output is identical to plain greedy decoding);
        `mtp_draft_tokens=k` (kwarg or generation config, default 1) drafts k tokens per verification by chaining the
        module. Everything else goes to `GenerationMixin.generate` (transformers' own `use_mtp` path would load a
        second copy)."""
        use_mtp = kwargs.pop("use_mtp", None)
        if use_mtp is None:
            use_mtp = getattr(generation_config if generation_config is not None else self.generation_config, "use_mtp", None)
        if use_mtp:
            from .speculative import mtp_speculative_generate

            return mtp_speculative_generate(self, inputs, generation_config, **kwargs)
        if generation_config is not None and getattr(generation_config, "use_mtp", None):
            generation_config = copy.deepcopy(generation_config)
            generation_config.use_mtp = None
        return super().generate(inputs, generation_config=generation_config, **kwargs)

    def save_pretrained(self, save_directory, *args, state_dict=None, **kwargs):
        """Also writes the MTP layers' copies of the shared embedding and head (`model.layers.{N}.embed_tokens.weight`,
        `model.layers.{N}.shared_head.head.weight`), as in the published checkpoints, so engines find them; also into a
        `state_dict` passed in (the full weights FSDP / ZeRO-3 gather for the final save) and into the one
        transformers gathers itself for a model it sharded (`gather_sharded_state_dict_for_save`)."""
        if state_dict is None and self.config.num_nextn_predict_layers:
            state_dict = self.state_dict()
        return super().save_pretrained(save_directory, *args, state_dict=self._with_mtp_copies(state_dict), **kwargs)

    def gather_sharded_state_dict_for_save(self, *args, **kwargs):
        # FSDP-sharded by `from_pretrained(distributed_config=...)`: transformers gathers the weights anew for saving
        return self._with_mtp_copies(super().gather_sharded_state_dict_for_save(*args, **kwargs))

    def _with_mtp_copies(self, state_dict):
        """`state_dict` plus each MTP layer's copies of the embedding and head; a rank that holds no tensors (a
        gathered dict is empty off the main process) gets its dict back unchanged."""
        if not self.config.num_nextn_predict_layers or not state_dict or "model.embed_tokens.weight" not in state_dict:
            return state_dict
        state_dict = dict(state_dict)
        embed = state_dict["model.embed_tokens.weight"]
        head = state_dict.get("lm_head.weight", embed)
        for k in range(self.config.num_nextn_predict_layers):
            prefix = f"model.layers.{self.config.num_hidden_layers + k}."
            state_dict[prefix + MTP_SHARED_COPIES[0]] = embed.detach().clone()
            state_dict[prefix + MTP_SHARED_COPIES[1]] = head.detach().clone()
        return state_dict


class DeepseekV3ForSequenceClassification(GenericForSequenceClassification, DeepseekV3PreTrainedModel):
    """transformers' sequence-classification head (`score` on the last non-padding token) over `DeepseekV3Model`:
    reward models for GRPO / RLHF. Built without MTP modules (a classifier never runs them); the MTP layers of a
    causal-LM checkpoint are ignored on load."""

    def __init__(self, config):
        config.num_nextn_predict_layers = 0
        super().__init__(config)
        self._ignore_layers_beyond_mtp()


class DeepseekV3ForTokenClassification(GenericForTokenClassification, DeepseekV3PreTrainedModel):
    """transformers' token-classification head (`score` per position) over `DeepseekV3Model`, without MTP modules."""

    def __init__(self, config):
        config.num_nextn_predict_layers = 0
        super().__init__(config)
        self._ignore_layers_beyond_mtp()


__all__ = [
    "DeepseekV3PreTrainedModel",
    "DeepseekV3ForSequenceClassification",
    "DeepseekV3ForTokenClassification",
    "DeepseekV3Model",
    "DeepseekV3ForCausalLM",
    "DeepseekV3ModelOutput",
    "DeepseekV3CausalLMOutputWithPast",
]
