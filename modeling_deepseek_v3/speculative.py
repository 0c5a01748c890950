"""MTP self-speculative decoding: the model's own Multi-Token Prediction module drafts, the main model verifies.

DeepSeek-V3 serves with its MTP module as a draft model (paper: 85-90% acceptance of the second token). One
iteration, for every row of the batch at once, with k draft tokens (`mtp_draft_tokens`, default 1):

    verify:  main model on [x_n, d_1 .. d_k] at positions n .. n+k -> logits for x_{n+1} .. x_{n+k+1}, hidden h_n ..
    accept:  the longest prefix of drafts the main model agrees with -- greedy: d_j == argmax; sampling: the rejection
             rule u < p(d_j) / q(d_j), the first rejected position resampled from norm(max(p - q, 0)) -- so the
             emitted tokens are distributed exactly as the main model's (Leviathan et al.). A row that accepts a
             drafts emits a + 1 tokens: d_1 .. d_a and the main model's token at slot a (correction or bonus).
    draft:   MTP module at positions n .. n+k on (h_i, x_{i+1}) (the emitted tokens); the first draft of the next
             iteration is read at each row's last accepted slot. Drafts 2..k reuse the same module autoregressively
             one position further on its own output hidden state (as vLLM and SGLang chain DeepSeek's single MTP
             module; a checkpoint with several MTP modules also drafts with its first one only); those steps only
             touch the MTP block's cache and are dropped before the next verification.

Cache: one `DynamicCache` holds the main layers and the MTP block (layer index num_hidden_layers), slot-aligned:
slot i of every layer belongs to the same position. Rejected drafts leave dead slots (main KV of d_j, MTP KV of its
position); rows accept different numbers of tokens, so dead slots are masked per row in the 2D attention mask and
positions are tracked per row. Trailing slots that no running row accepted (always all of them for batch size 1)
are rolled back with `cache.crop`, on every layer, the MTP block included.
"""

import copy
import logging
import time
from dataclasses import dataclass, field

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
from ._compat import create_causal_mask
from .attention import attention_bias

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
    (main-model) forward, 1 + k * acceptance for k draft tokens -- the upper bound of the decode speed-up.
    acceptance_by_position[j]: fraction of verifications in which drafts 1 .. j+1 were all accepted."""

    draft_tokens: int = 1
    target_forwards: int = 0
    row_forwards: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    accepted_prefixes: list[int] = field(default_factory=list)  # [k]: verifications that accepted >= j+1 drafts
    prefill_seconds: float = 0.0  # wall time of the prompt forward (main + MTP) and the first token
    decode_seconds: float = 0.0  # wall time of the draft/verify loop

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_tokens(self) -> float:
        return self.emitted / self.row_forwards if self.row_forwards else 0.0

    @property
    def acceptance_by_position(self) -> list[float]:
        return [n / self.row_forwards if self.row_forwards else 0.0 for n in self.accepted_prefixes]


@dataclass
class SpeculativeGenerateOutput(GenerateDecoderOnlyOutput):
    """`generate(..., use_mtp=True, return_dict_in_generate=True)` output: sequences plus the speculation stats."""

    acceptance_rate: float | None = None
    mean_accepted_tokens: float | None = None
    target_forwards: int | None = None
    acceptance_by_position: list[float] | None = None


class MTPSpeculativeDecoder:
    """Runs `generate` for a `DeepseekV3ForCausalLM` with its first MTP module as the draft model."""

    def __init__(self, model, generation_config: GenerationConfig, draft_tokens: int | None = None):
        if not model.config.num_nextn_predict_layers:
            raise ValueError("use_mtp=True needs a model with MTP modules (config.num_nextn_predict_layers >= 1)")
        if draft_tokens is None:
            draft_tokens = getattr(generation_config, "mtp_draft_tokens", None) or 1
        if not isinstance(draft_tokens, int) or isinstance(draft_tokens, bool) or draft_tokens < 1:
            raise ValueError(f"mtp_draft_tokens={draft_tokens!r}: use a positive int (tokens drafted per verification)")
        self.draft_tokens = draft_tokens
        if (generation_config.num_beams or 1) > 1:
            raise ValueError("use_mtp=True supports greedy decoding and sampling, not beam search")
        unsupported = {  # logits processors this loop does not apply (it applies temperature, top-k and top-p)
            "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_new_tokens": 0, "min_length": 0,
            "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None, "min_p": None,
            "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "num_return_sequences": 1,
        }  # fmt: skip
        used = [k for k, default in unsupported.items() if getattr(generation_config, k, None) not in (None, default)]
        used += [k for k in ("output_attentions", "output_hidden_states") if getattr(generation_config, k, False)]
        if used:
            raise ValueError(f"use_mtp=True does not support the generation options {used}")
        # `output_scores` / `output_logits` with `return_dict_in_generate`: per generated token, the main model's
        # processed scores / raw logits at the slot that emitted it (as transformers' assisted decoding returns them)
        self.keep_logits = bool(generation_config.return_dict_in_generate) and bool(
            generation_config.output_scores or generation_config.output_logits
        )
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
        self.stats = SpeculativeStats(draft_tokens=draft_tokens)

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

    def mtp_forward(self, hidden, next_ids, positions, mask4d, cache):
        """MTP block on h [B, S, D] and the tokens that follow [B, S] -> its normed output [B, S, D] (logits via
        lm_head; also the hidden state a chained draft step starts from)."""
        embeds = self.model.model.embed_tokens(next_ids)
        position_embeddings = self.model.model.rotary_emb(embeds, positions)
        out, _ = self.mtp(hidden, embeds, position_embeddings=position_embeddings, attention_mask=mask4d, cache=cache)
        return out

    def target(self, ids, mask2d, positions, cache):
        """Main model -> (normed hidden [B, S, D], logits [B, S, V], the 4D mask of this step for the MTP block)."""
        embeds = self.model.model.embed_tokens(ids)
        mask4d = create_causal_mask(
            config=self.config, inputs_embeds=embeds, attention_mask=mask2d, cache=cache, position_ids=positions,
        )  # fmt: skip
        out = self.model.model(inputs_embeds=embeds, attention_mask=mask4d, position_ids=positions,
                               cache=cache, use_cache=True)  # 4D mask: used as is  # fmt: skip
        hidden = out.last_hidden_state
        return hidden, self.model.lm_head(hidden), mask4d

    def draft_chain(self, hidden, position, mask2d, cache):
        """k drafts from the MTP output at each row's last accepted slot, hidden [B, 1, D] (its logits give the first
        draft, for the token after `position`, the position of the token the next verification starts with).
        Draft j + 1 runs the MTP block one position further on (its own output, draft j); those steps go into the
        MTP block's cache after the slots shared with the main layers and are cropped again here.
        Returns drafts [B, k] and, when sampling, their distributions q [B, k, V]."""
        drafts, probs = [], []
        for j in range(self.draft_tokens):
            if j > 0:
                # MTP at position P + j - 1 on (previous MTP output, previous draft); it attends to the valid slots
                # (mask2d) and to the chained steps before it
                visible = torch.cat((mask2d, mask2d.new_ones(mask2d.shape[0], j)), dim=1).bool()[:, None, None, :]
                bias = attention_bias(visible, len(visible), 1, visible.shape[-1], hidden.device, hidden.dtype)
                hidden = self.mtp_forward(hidden, drafts[-1][:, None], (position + j - 1)[:, None], bias, cache)
            logits = self.model.lm_head(hidden[:, -1])
            if self.do_sample:
                q = self.probs(logits)
                drafts.append(torch.multinomial(q, 1).squeeze(-1))
                probs.append(q)
            else:
                drafts.append(logits.argmax(-1))
        if self.draft_tokens > 1:
            cache.layers[self.mtp.layer_idx].crop(-(self.draft_tokens - 1))
        return torch.stack(drafts, dim=1), (torch.stack(probs, dim=1) if self.do_sample else None)

    def accept(self, drafts, draft_probs, logits):
        """drafts [B, k], their distributions q [B, k, V] (sampling), verification logits [B, k + 1, V]
        -> (accepted drafts per row a [B], the main model's token at slot a [B]: correction or bonus)."""
        batch, k = drafts.shape
        rows = torch.arange(batch, device=drafts.device)
        if not self.do_sample:
            target_ids = logits.argmax(-1)  # [B, k + 1]
            agree = drafts == target_ids[:, :k]
            accepted = agree.long().cumprod(-1).sum(-1)  # leading drafts that agree
            return accepted, target_ids[rows, accepted]
        p = self.probs(logits.flatten(0, 1)).view(batch, k + 1, -1)  # [B, k + 1, V]
        p_draft = p[:, :k].gather(-1, drafts[..., None]).squeeze(-1)  # [B, k]
        q_draft = draft_probs.gather(-1, drafts[..., None]).squeeze(-1)
        agree = torch.rand(batch, k, device=drafts.device) * q_draft < p_draft  # u < p(d) / q(d)
        accepted = agree.long().cumprod(-1).sum(-1)
        p_at = p[rows, accepted]  # [B, V]: the target law at the first rejected slot, or the bonus slot
        residual = (p_at - draft_probs[rows, accepted.clamp(max=k - 1)]).clamp(min=0)
        residual_sum = residual.sum(-1, keepdim=True)
        residual = torch.where(residual_sum > 0, residual / residual_sum.clamp(min=1e-30), p_at)
        law = torch.where((accepted < k)[:, None], residual, p_at)
        return accepted, torch.multinomial(law, 1).squeeze(-1)

    # ---- the loop -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None):
        gc = self.generation_config
        k = self.draft_tokens
        batch, prompt_len = input_ids.shape
        device = input_ids.device
        max_new = gc.max_new_tokens if gc.max_new_tokens is not None else (gc.max_length or 20) - prompt_len
        eos = self.eos.to(device)
        rows = torch.arange(batch, device=device)
        slots = torch.arange(k + 1, device=device)  # offsets of the tokens one verification feeds
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
        mtp_out = self.mtp_forward(hidden, next_ids, positions, mask4d, cache)[:, -1:]  # [B, 1, D]
        current = first  # last emitted token, not yet fed to the main model
        position = positions[:, -1] + 1  # its position
        drafts, draft_probs = self.draft_chain(mtp_out, position, mask2d, cache)

        # out: emitted tokens; the last column collects writes of finished rows and is never returned
        out = torch.full((batch, max_new + k + 2), self.pad, dtype=torch.long, device=device)
        out[:, 0] = first
        emitted_logits = None  # [B, max_new + k + 2, V] raw logits of each emitted token (when asked for)
        if self.keep_logits:
            emitted_logits = logits.new_zeros(batch, out.shape[1], logits.shape[-1], dtype=torch.float32)
            emitted_logits[:, 0] = logits[:, -1]
        n_out = torch.ones(batch, dtype=torch.long, device=device)
        done = torch.isin(first, eos) | (n_out >= max_new)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the prefill's kernels end before the decode clock starts
        decode_start = time.perf_counter()
        self.stats.prefill_seconds = decode_start - start

        counters = torch.zeros(4 + k, dtype=torch.long, device=device)  # rows, drafted, accepted, emitted, prefixes
        while not bool(done.all()):
            active = ~done
            step_ids = torch.cat((current[:, None], drafts), dim=1)  # [B, k + 1]
            step_pos = position[:, None] + slots  # [B, k + 1]
            mask2d = torch.cat((mask2d, mask2d.new_ones(batch, k + 1)), dim=1)
            hidden, logits, mask4d = self.target(step_ids, mask2d, step_pos, cache)  # one verification forward
            accepted, last = self.accept(drafts, draft_probs, logits)

            # emitted tokens d_1 .. d_a, last; cut after an end-of-sequence token
            emitted = torch.where(slots < accepted[:, None], torch.cat((drafts, last[:, None]), dim=1), last[:, None])
            is_eos = torch.isin(emitted, eos) & (slots <= accepted[:, None])
            n_emit = torch.where(is_eos.any(-1), is_eos.long().argmax(-1) + 1, accepted + 1)  # [B]
            write = active[:, None] & (slots < n_emit[:, None])
            columns = torch.where(write, n_out[:, None] + slots, out.shape[1] - 1)
            out.scatter_(1, columns, emitted)
            if emitted_logits is not None:
                emitted_logits.scatter_(1, columns[..., None].expand(-1, -1, logits.shape[-1]), logits.float())
            n_out = n_out + torch.where(active, n_emit, 0)
            done = done | (active & is_eos.any(-1)) | (n_out >= max_new)

            # stats over running rows (device counters: no host sync here)
            self.stats.target_forwards += 1
            counters += torch.cat((
                torch.stack((active.sum(), k * active.sum(), (accepted * active).sum(), (n_emit * active).sum())),
                ((accepted[:, None] > slots[:k]) & active[:, None]).sum(0),
            ))  # fmt: skip

            # the draft slots after each row's last accepted one are dead for that row: masked; the trailing ones
            # that no running row accepted are rolled back from the main layers before the MTP block runs
            mask2d[:, -(k + 1) :] = (slots <= accepted[:, None]).long()
            kept = int(torch.where(active, accepted, 0).max()) + 1  # slots still needed: 0 .. max accepted
            if kept < k + 1:
                for layer in cache.layers[: self.mtp.layer_idx]:
                    layer.crop(kept - (k + 1))
                mask2d = mask2d[:, : mask2d.shape[1] - (k + 1 - kept)]
                if mask4d is not None:  # [B, 1, k + 1, T] -> the kept queries and keys
                    mask4d = mask4d[:, :, :kept, : mask4d.shape[-1] - (k + 1 - kept)]
            # MTP at the kept positions n .. n+kept-1 on (h_i, x_{i+1}); each row drafts from its last accepted slot
            mtp_out = self.mtp_forward(hidden[:, :kept], emitted[:, :kept], step_pos[:, :kept], mask4d, cache)
            mtp_out = mtp_out[rows, accepted.clamp(max=kept - 1)][:, None]  # [B, 1, D]
            current = last
            position = position + accepted + 1
            drafts, draft_probs = self.draft_chain(mtp_out, position, mask2d, cache)

        self.stats.decode_seconds = time.perf_counter() - decode_start
        values = counters.tolist()
        self.stats.row_forwards, self.stats.drafted, self.stats.accepted, self.stats.emitted = values[:4]
        self.stats.accepted_prefixes = values[4:]
        self.cache, self.attention_mask = cache, mask2d  # kept for inspection (tests check the rollback)
        sequences = self.finish(input_ids, out, n_out, max_new)
        self.emitted_logits = None
        if emitted_logits is not None:
            self.emitted_logits = emitted_logits[:, : sequences.shape[1] - prompt_len]
        return sequences

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
    draft_tokens = model_kwargs.pop("mtp_draft_tokens", None)
    unsupported = {k: v for k, v in model_kwargs.items() if v is not None and k != "use_cache"}
    if unsupported:
        raise ValueError(f"use_mtp=True does not support the generate arguments {sorted(unsupported)}")
    decoder = MTPSpeculativeDecoder(model, generation_config, draft_tokens)
    sequences = decoder.generate(input_ids, attention_mask)
    stats = decoder.stats
    model.speculative_stats = stats
    model.speculative_decoder = decoder
    logger.info(
        "MTP speculative decoding (%d draft tokens): acceptance rate %.3f, %.3f tokens per target forward "
        "(%d forwards)",
        stats.draft_tokens, stats.acceptance_rate, stats.mean_accepted_tokens, stats.target_forwards,
    )  # fmt: skip
    if generation_config.return_dict_in_generate:
        scores = logits = None
        if decoder.emitted_logits is not None:
            raw = decoder.emitted_logits.unbind(1)  # per generated position: [B, V]
            if generation_config.output_logits:
                logits = raw
            if generation_config.output_scores:
                scores = tuple(decoder.warpers(None, x) if len(decoder.warpers) else x for x in raw)
        return SpeculativeGenerateOutput(
            sequences=sequences,
            scores=scores,
            logits=logits,
            acceptance_rate=stats.acceptance_rate,
            mean_accepted_tokens=stats.mean_accepted_tokens,
            target_forwards=stats.target_forwards,
            acceptance_by_position=stats.acceptance_by_position,
        )
    return sequences
