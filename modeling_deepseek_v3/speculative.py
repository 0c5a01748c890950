"""MTP self-speculative decoding: the model's own Multi-Token Prediction module drafts, the main model verifies.

DeepSeek-V3 serves with its MTP module as a draft model (paper: 85-90% acceptance of the second token). One
iteration, for every row of the batch at once (depth 1, the first MTP module):

    verify:  main model on [x_n, d_{n+1}] at positions (n, n+1) -> logits for x_{n+1} and x_{n+2}, hidden h_n, h_{n+1}
    accept:  greedy: d_{n+1} == argmax; sampling: the rejection rule u < p(d) / q(d), else resample from
             norm(max(p - q, 0)) -- the emitted tokens are distributed exactly as the main model's (Leviathan et al.).
             Accepted rows emit d_{n+1} and a bonus token x_{n+2}; rejected rows emit the corrected x_{n+1}.
    draft:   MTP module at positions (n, n+1) on (h_n, Emb(x_{n+1})) and (h_{n+1}, Emb(x_{n+2})); the draft for the
             next iteration is read at the last accepted position of each row.

Cache: one `DynamicCache` holds the main layers and the MTP block (layer index num_hidden_layers), slot-aligned:
slot i of every layer belongs to the same position. A rejected draft leaves a dead slot (main KV of d_{n+1}, MTP KV
of position n+1); rows accept different numbers of tokens, so dead slots are masked per row in the 2D attention mask
and positions are tracked per row. When every running row rejected (always the case for batch size 1), the slot is
rolled back with `cache.crop(-1)` on all layers, MTP layer included.
"""

import copy
import logging
import time
from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.masking_utils import create_causal_mask

logger = logging.getLogger(__name__)


def cache_bytes_per_token_per_layer(cache) -> list[int]:
    """Bytes stored per token and batch row in each attention layer of a filled cache (keys + values slots)."""
    sizes = []
    for layer in cache.layers:
        if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
            continue
        batch, length = layer.keys.shape[0], layer.keys.shape[-2]
        total = layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
        sizes.append(total // (batch * length))
    return sizes


@dataclass
class SpeculativeStats:
    """Counts over all rows and verification steps (a row counts while it is still generating).

    acceptance_rate: accepted drafts / drafts verified. mean_accepted_tokens: tokens emitted per row per target
    (main-model) forward, 1 + acceptance for one draft token -- the upper bound of the decode speed-up."""

    target_forwards: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    prefill_seconds: float = 0.0  # wall time of the prompt forward (main + MTP) and the first token
    decode_seconds: float = 0.0  # wall time of the draft/verify loop

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_tokens(self) -> float:
        return self.emitted / self.drafted if self.drafted else 0.0


@dataclass
class SpeculativeGenerateOutput(GenerateDecoderOnlyOutput):
    """`generate(..., use_mtp=True, return_dict_in_generate=True)` output: sequences plus the speculation stats."""

    acceptance_rate: float | None = None
    mean_accepted_tokens: float | None = None
    target_forwards: int | None = None


class MTPSpeculativeDecoder:
    """Runs `generate` for a `DeepseekV3ForCausalLM` with its first MTP module as the draft model."""

    def __init__(self, model, generation_config: GenerationConfig):
        if not model.config.num_nextn_predict_layers:
            raise ValueError("use_mtp=True needs a model with MTP modules (config.num_nextn_predict_layers >= 1)")
        if (generation_config.num_beams or 1) > 1:
            raise ValueError("use_mtp=True supports greedy decoding and sampling, not beam search")
        unsupported = {  # logits processors this loop does not apply (it applies temperature, top-k and top-p)
            "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_new_tokens": 0, "min_length": 0,
            "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None, "min_p": None,
            "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "num_return_sequences": 1,
        }  # fmt: skip
        used = [k for k, default in unsupported.items() if getattr(generation_config, k, None) not in (None, default)]
        if used:
            raise ValueError(f"use_mtp=True does not support the generation options {used}")
        self.model = model
        self.config = model.config
        self.mtp = model.model.mtp_layers[0]
        self.generation_config = generation_config
        self.do_sample = bool(generation_config.do_sample)
        self.warpers = LogitsProcessorList()
        if self.do_sample:
            gc = generation_config
            if gc.temperature is not None and gc.temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(gc.temperature))
            if gc.top_k is not None and gc.top_k > 0:
                self.warpers.append(TopKLogitsWarper(gc.top_k))
            if gc.top_p is not None and gc.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(gc.top_p))
        eos = generation_config.eos_token_id
        self.eos = torch.tensor([] if eos is None else ([eos] if isinstance(eos, int) else list(eos)), dtype=torch.long)
        pad = generation_config.pad_token_id
        self.pad = pad if pad is not None else (int(self.eos[0]) if self.eos.numel() else 0)
        self.stats = SpeculativeStats()

    # ---- token choice -------------------------------------------------------------------------------------------

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """[N, V] logits -> the (warped) sampling distribution [N, V] in fp32."""
        scores = self.warpers(None, logits.float()) if len(self.warpers) else logits.float()
        return torch.softmax(scores, dim=-1)

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """[N, V] -> next tokens [N] (argmax, or a sample from `probs`)."""
        if not self.do_sample:
            return logits.argmax(-1)
        return torch.multinomial(self.probs(logits), 1).squeeze(-1)

    # ---- model pieces -------------------------------------------------------------------------------------------

    def draft(self, hidden, next_ids, positions, mask4d, cache):
        """MTP block on h^0 [B, S, D] and the tokens that follow [B, S] -> draft logits [B, S, V]."""
        embeds = self.model.model.embed_tokens(next_ids)
        position_embeddings = self.model.model.rotary_emb(embeds, positions)
        out, _ = self.mtp(hidden, embeds, position_embeddings=position_embeddings, attention_mask=mask4d,
                          past_key_values=cache)  # fmt: skip
        return self.model.lm_head(out)

    def target(self, ids, mask2d, positions, cache):
        """Main model -> (normed hidden [B, S, D], logits [B, S, V], the 4D mask of this step for the MTP block)."""
        embeds = self.model.model.embed_tokens(ids)
        mask4d = create_causal_mask(
            config=self.config, inputs_embeds=embeds, attention_mask=mask2d, past_key_values=cache,
            position_ids=positions,
        )  # fmt: skip
        out = self.model.model(inputs_embeds=embeds, attention_mask=mask4d, position_ids=positions,
                               past_key_values=cache, use_cache=True)  # 4D mask: used as is  # fmt: skip
        hidden = out.last_hidden_state
        return hidden, self.model.lm_head(hidden), mask4d

    # ---- the loop -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None):
        gc = self.generation_config
        batch, prompt_len = input_ids.shape
        device = input_ids.device
        max_new = gc.max_new_tokens if gc.max_new_tokens is not None else (gc.max_length or 20) - prompt_len
        eos = self.eos.to(device)
        rows = torch.arange(batch, device=device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask2d = attention_mask.long()
        positions = (mask2d.cumsum(-1) - 1).clamp(min=0)  # [B, n] as transformers' generate computes them

        cache = DynamicCache(config=self.config)
        while len(cache.layers) <= self.mtp.layer_idx:  # the MTP block caches in the same object
            cache.layers.append(DynamicLayer())

        # prefill: main model on the prompt, first token from its last position, MTP over the prompt
        start = time.perf_counter()
        hidden, logits, mask4d = self.target(input_ids, mask2d, positions, cache)
        first = self.choose(logits[:, -1])  # [B]
        next_ids = torch.cat((input_ids[:, 1:], first[:, None]), dim=1)  # token t+1 for every prompt position t
        draft_logits = self.draft(hidden, next_ids, positions, mask4d, cache)[:, -1]  # [B, V]

        out = torch.full((batch, max_new + 2), self.pad, dtype=torch.long, device=device)
        out[:, 0] = first
        n_out = torch.ones(batch, dtype=torch.long, device=device)
        done = torch.isin(first, eos) | (n_out >= max_new)
        current = first  # last emitted token, not yet fed to the main model
        position = positions[:, -1] + 1  # its position
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the prefill's kernels end before the decode clock starts
        decode_start = time.perf_counter()
        self.stats.prefill_seconds = decode_start - start

        drafted = accepted = torch.zeros((), dtype=torch.long, device=device)
        while not bool(done.all()):
            active = ~done
            draft_probs = self.probs(draft_logits) if self.do_sample else None
            draft = self.choose(draft_logits) if not self.do_sample else torch.multinomial(draft_probs, 1).squeeze(-1)

            step_ids = torch.stack((current, draft), dim=1)  # [B, 2]
            step_pos = torch.stack((position, position + 1), dim=1)  # [B, 2]
            mask2d = torch.cat((mask2d, mask2d.new_ones(batch, 2)), dim=1)
            hidden, logits, mask4d = self.target(step_ids, mask2d, step_pos, cache)  # one verification forward

            if self.do_sample:
                p = self.probs(logits.flatten(0, 1)).view(batch, 2, -1)  # [B, 2, V]
                p_draft, q_draft = p[rows, 0, draft], draft_probs[rows, draft]
                accept = torch.rand(batch, device=device) * q_draft < p_draft  # u < p(d) / q(d)
                residual = (p[:, 0] - draft_probs).clamp(min=0)
                residual_sum = residual.sum(-1, keepdim=True)
                residual = torch.where(residual_sum > 0, residual / residual_sum.clamp(min=1e-30), p[:, 0])
                corrected = torch.multinomial(residual, 1).squeeze(-1)
                bonus = torch.multinomial(p[:, 1], 1).squeeze(-1)
            else:
                target_ids = logits.argmax(-1)  # [B, 2]
                accept = draft == target_ids[:, 0]
                corrected, bonus = target_ids[:, 0], target_ids[:, 1]
            first_new = torch.where(accept, draft, corrected)  # [B]
            accept = accept & active & ~torch.isin(first_new, eos)  # no bonus token after an end-of-sequence

            # stats over running rows (device counters: no host sync here)
            self.stats.target_forwards += 1
            drafted = drafted + active.sum()
            accepted = accepted + accept.sum()

            # emit (finished rows write into their padding tail, which is reset below)
            write = torch.where(active, n_out, out.shape[1] - 2)
            out[rows, write] = torch.where(active, first_new, self.pad)
            out[rows, write + 1] = torch.where(accept, bonus, out[rows, write + 1])
            n_out = n_out + active.long() + accept.long()
            emitted_eos = torch.isin(first_new, eos) | (accept & torch.isin(bonus, eos))
            done = done | (active & emitted_eos) | (n_out >= max_new)

            # MTP at positions (n, n+1) on (h_n, x_{n+1}) and (h_{n+1}, x_{n+2}); each row drafts from its last
            # accepted position (slot 1 of a rejected row is dead: computed, then masked / cropped)
            mtp_ids = torch.stack((first_new, torch.where(accept, bonus, first_new)), dim=1)  # [B, 2]
            draft_logits = self.draft(hidden, mtp_ids, step_pos, mask4d, cache)[rows, accept.long()]  # [B, V]
            # the draft's slot stays valid only where it was accepted; roll it back when no row needs it
            mask2d[:, -1] = accept.long()
            if not bool(accept.any()):
                cache.crop(-1)  # every layer, the MTP block's included
                mask2d = mask2d[:, :-1]
            current = torch.where(accept, bonus, first_new)
            position = position + 1 + accept.long()

        self.stats.decode_seconds = time.perf_counter() - decode_start
        self.stats.drafted, self.stats.accepted = int(drafted), int(accepted)
        self.stats.emitted = self.stats.drafted + self.stats.accepted
        self.cache, self.attention_mask = cache, mask2d  # kept for inspection (tests check the rollback)
        return self.finish(input_ids, out, n_out, max_new)

    def finish(self, input_ids, out, n_out, max_new):
        """Rows cut at max_new tokens and after their first EOS, padded to the longest row (as `generate` does)."""
        batch = out.shape[0]
        lengths = n_out.clamp(max=max_new)
        index = torch.arange(out.shape[1], device=out.device)[None]
        is_eos = torch.isin(out, self.eos.to(out.device)) & (index < lengths[:, None])
        first_eos = torch.where(is_eos.any(-1), is_eos.float().argmax(-1) + 1, lengths)
        lengths = torch.minimum(lengths, first_eos)
        out = out.masked_fill(index >= lengths[:, None], self.pad)[:, : int(lengths.max()) if batch else 0]
        return torch.cat((input_ids, out), dim=1)


def mtp_speculative_generate(model, inputs=None, generation_config=None, **kwargs):
    """Entry point of `DeepseekV3ForCausalLM.generate(..., use_mtp=True)`."""
    generation_config = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
    model_kwargs = generation_config.update(**kwargs)
    input_ids = inputs if inputs is not None else model_kwargs.pop("input_ids", None)
    if input_ids is None:
        raise ValueError("use_mtp=True needs `input_ids`")
    attention_mask = model_kwargs.pop("attention_mask", None)
    unsupported = {k: v for k, v in model_kwargs.items() if v is not None and k != "use_cache"}
    if unsupported:
        raise ValueError(f"use_mtp=True does not support the generate arguments {sorted(unsupported)}")
    decoder = MTPSpeculativeDecoder(model, generation_config)
    sequences = decoder.generate(input_ids, attention_mask)
    stats = decoder.stats
    model.speculative_stats = stats
    model.speculative_decoder = decoder
    logger.info(
        "MTP speculative decoding: acceptance rate %.3f, %.3f tokens per target forward (%d forwards)",
        stats.acceptance_rate, stats.mean_accepted_tokens, stats.target_forwards,
    )  # fmt: skip
    if generation_config.return_dict_in_generate:
        return SpeculativeGenerateOutput(
            sequences=sequences,
            acceptance_rate=stats.acceptance_rate,
            mean_accepted_tokens=stats.mean_accepted_tokens,
            target_forwards=stats.target_forwards,
        )
    return sequences
