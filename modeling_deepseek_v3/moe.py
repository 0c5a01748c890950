"""DeepSeekMoE: shared experts + fine-grained routed experts with group-limited sigmoid routing.

Routing (`DeepseekV3TopkRouter`, checkpoint name `mlp.gate`), for each token:
  1. affinities s_i = sigmoid(u . e_i) (or softmax for V2-style configs);
  2. selection scores s_i + b_i, where b = `e_score_correction_bias` is the auxiliary-loss-free balancing bias:
     it changes WHICH experts are chosen, never the weights they get;
  3. group limit: experts are split into n_group groups, a group scores the sum of its top-2 selection scores,
     only the topk_group best groups stay eligible;
  4. top-k of the eligible experts; gate weights are the raw affinities of the chosen experts, normalized to sum
     to 1 (norm_topk_prob) and multiplied by routed_scaling_factor.

While training, the model adds up how many tokens each expert received (`tokens_per_expert`, summed over forward
passes until someone resets it): the balancing code in `deepseek_v3.trainers.balancing` turns those counts into bias updates.
It can also compute the complementary sequence-wise balance loss (paper eqs. 17-20).

Shapes: N tokens (batch * seq flattened), E routed experts, K experts per token, D hidden, I expert width.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations import use_experts_implementation

from .layers import DeepseekV3MLP


class RouterOutput(NamedTuple):
    topk_indices: torch.Tensor  # [N, K] chosen experts
    topk_weights: torch.Tensor  # [N, K] gate weights (fp32)
    balance_loss: torch.Tensor | None  # scalar sequence-wise balance loss (already times alpha), or None
    router_logits: torch.Tensor | None = None  # [N, E] raw gate logits u . e_i (fp32), as transformers' routers return


class DeepseekV3TopkRouter(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group or 1
        self.topk_group = config.topk_group or 1
        self.topk_method = config.topk_method
        self.scoring_func = config.scoring_func
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))
        # fp32, never trained by gradients: updated by the aux-loss-free balancing rule (deepseek_v3.trainers.balancing).
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32))
        # Routed-token counts since the last reset (training only); not saved in checkpoints.
        self.register_buffer("tokens_per_expert", torch.zeros(self.num_experts, dtype=torch.float32), persistent=False)
        # What `record_load` counts (set once by the balancing code): only forwards that build a graph (the ones
        # trained on; not generation / old-policy log-probs run in train mode), and never padding tokens.
        self.track_expert_load = True
        self.count_no_grad_forwards = False
        self.count_padding = False

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` / `.half()` must not cast the balancing state: bf16 counts are exact only up to
        # 256 and bf16 biases would swallow gamma=0.001 updates. Keep both buffers fp32 (devices still follow `fn`).
        names = ("e_score_correction_bias", "tokens_per_expert")
        fp32 = {name: self._buffers[name] for name in names}
        super()._apply(fn, recurse)
        for name in names:
            buffer = self._buffers[name]
            if buffer is not None and buffer.dtype != torch.float32:
                self._buffers[name] = fp32[name].to(device=buffer.device, dtype=torch.float32)
        return self

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[N, D] -> raw gate logits [N, E] in fp32."""
        return F.linear(hidden_states.float(), self.weight.float())

    def affinities(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[N, D] -> token-to-expert affinities [N, E] in fp32."""
        return self.scores_from_logits(self.logits(hidden_states))

    def scores_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)

    def select_experts(self, scores: torch.Tensor) -> torch.Tensor:
        """Group-limited top-k on the bias-corrected scores: [N, E] -> expert indices [N, K]."""
        if self.topk_method == "greedy":
            return scores.topk(self.top_k, dim=-1, sorted=False).indices
        choice = scores + self.e_score_correction_bias if self.topk_method == "noaux_tc" else scores
        if self.n_group > 1:
            grouped = choice.view(-1, self.n_group, self.num_experts // self.n_group)
            if self.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [N, n_group]
            else:  # group_limited_greedy (V2): best expert of the group
                group_scores = grouped.max(dim=-1).values
            group_idx = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
            choice = grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).flatten(1)
        return choice.topk(self.top_k, dim=-1, sorted=False).indices

    def forward(self, hidden_states: torch.Tensor, batch_size: int = 1) -> RouterOutput:
        """hidden_states [N, D] with N = batch_size * seq_len (sequence order kept, for the balance loss)."""
        logits = self.logits(hidden_states)
        scores = self.scores_from_logits(logits)
        topk_indices = self.select_experts(scores.detach())
        topk_weights = scores.gather(1, topk_indices)
        if self.norm_topk_prob:  # also for top_k = 1 (weight 1), as DeepSeek's reference and the built-in class
            topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
        topk_weights = topk_weights * self.routed_scaling_factor

        balance_loss = None
        alpha = self.config.effective_seq_aux_loss_alpha
        if self.training and alpha > 0:
            balance_loss = alpha * sequence_balance_loss(scores, topk_indices, batch_size, self.num_experts)
        return RouterOutput(topk_indices, topk_weights, balance_loss, logits)

    def record_load(self, topk_indices: torch.Tensor, token_mask: torch.Tensor | None = None) -> None:
        """Add this forward's routed-token counts to `tokens_per_expert` (token_mask [N] bool: real tokens).
        Called by the model once per training forward (not from `forward`, which gradient checkpointing re-runs
        during backward and would count twice)."""
        if not self.track_expert_load or not (torch.is_grad_enabled() or self.count_no_grad_forwards):
            return
        with torch.no_grad():
            if token_mask is not None and not self.count_padding:
                topk_indices = topk_indices[token_mask.to(topk_indices.device)]
            counts = torch.bincount(topk_indices.flatten(), minlength=self.num_experts)
            self.tokens_per_expert += counts.to(self.tokens_per_expert.dtype)


def sequence_balance_loss(
    scores: torch.Tensor, topk_indices: torch.Tensor, batch_size: int, num_experts: int
) -> torch.Tensor:
    """Complementary sequence-wise balance loss sum_i f_i * P_i, averaged over sequences (paper eqs. 17-20).

    f_i = N_r / (K_r * T) * #{t : expert i in top-k(t)} and P_i = mean_t s'_{i,t}, with s' the affinities
    normalized over all experts. scores [B*T, E], topk_indices [B*T, K].
    """
    top_k = topk_indices.shape[-1]
    seq_len = scores.shape[0] // batch_size
    normalized = scores / scores.sum(dim=-1, keepdim=True)
    probs = normalized.view(batch_size, seq_len, num_experts).mean(dim=1)  # P [B, E]
    counts = torch.zeros(batch_size, num_experts, device=scores.device, dtype=scores.dtype)
    counts.scatter_add_(1, topk_indices.view(batch_size, -1), torch.ones_like(topk_indices, dtype=scores.dtype).view(batch_size, -1))
    fractions = counts * num_experts / (top_k * seq_len)  # f [B, E]
    return (fractions * probs).sum(dim=-1).mean()


EXPERTS_ON_META = (
    "The routed experts' weights are still on the meta device: checkpoints store them per expert "
    "(`mlp.experts.{e}.gate_proj/up_proj/down_proj`) and only `from_pretrained` fuses them into "
    "`experts.gate_up_proj` / `experts.down_proj`. Load with `from_pretrained(path, device_map=...)` "
    "instead of `init_empty_weights()` + `load_checkpoint_and_dispatch`."
)


def _grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [M, in] (rows sorted by expert, group g ends at offsets[g]) times weight[g]^T ([E, out, in]) -> [M, out]."""
    out = torch._grouped_mm(x, weight.transpose(1, 2), offs=offsets)
    if out.requires_grad:  # torch's CPU grouped-mm backward wants a dense gradient
        out.register_hook(lambda grad: grad.contiguous())
    return out


def _grouped_mm_available(x: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if torch.compiler.is_compiling():  # torch's grouped-mm meta kernel takes bf16 only
        return x.dtype == torch.bfloat16
    return x.device.type == "cpu" or x.dtype == torch.bfloat16


@use_experts_implementation
class DeepseekV3Experts(nn.Module):
    """The routed experts as two 3-D parameters (transformers' fused layout; split per expert on save).

    gate_up_proj [E, 2I, D] (gate rows first, then up rows), down_proj [E, D, I].

    The forward goes through transformers' experts interface (`experts_implementation` of `from_pretrained` /
    `model.set_experts_implementation`: "grouped_mm" (the default where torch has grouped GEMMs), "batched_mm",
    "eager" = `forward` below), which is also what expert parallelism hooks into."""

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.intermediate_size = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_size, config.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, config.hidden_size, self.intermediate_size))
        self.act_fn = ACT2FN[config.hidden_act]

    def _apply(self, fn, recurse=True):
        try:
            return super()._apply(fn, recurse)
        except NotImplementedError as error:  # "Cannot copy out of meta tensor" (e.g. accelerate's dispatch)
            if self.gate_up_proj.is_meta or self.down_proj.is_meta:
                raise RuntimeError(EXPERTS_ON_META) from error
            raise

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A plain `load_state_dict` of what `save_pretrained` wrote (the per-expert layout, e.g. Trainer's
        # `resume_from_checkpoint`, which bypasses from_pretrained's converters) would silently skip every routed
        # expert: fuse `{e}.gate_proj/up_proj/down_proj.weight` into our parameters first.
        if f"{prefix}0.down_proj.weight" in state_dict and f"{prefix}down_proj" not in state_dict:
            experts = range(self.num_experts)
            gate = torch.stack([state_dict.pop(f"{prefix}{e}.gate_proj.weight") for e in experts])
            up = torch.stack([state_dict.pop(f"{prefix}{e}.up_proj.weight") for e in experts])
            state_dict[f"{prefix}gate_up_proj"] = torch.cat([gate, up], dim=1)
            state_dict[f"{prefix}down_proj"] = torch.stack([state_dict.pop(f"{prefix}{e}.down_proj.weight") for e in experts])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, hidden_states: torch.Tensor, topk_indices: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """hidden_states [N, D], topk_indices/topk_weights [N, K] -> weighted sum of expert outputs [N, D].

        The "eager" implementation: (token, slot) pairs sorted by expert, one grouped GEMM per projection where
        torch has one for this dtype, else one matmul per expert (or, inside a compiled graph, a batched matmul
        against each pair's expert weights)."""
        top_k = topk_indices.shape[1]
        flat_experts = topk_indices.flatten()
        order = flat_experts.argsort(stable=True)  # (token, slot) pairs grouped by expert
        token_idx = order // top_k
        routed = hidden_states[token_idx]  # [N*K, D]
        sorted_experts = flat_experts[order]
        if _grouped_mm_available(routed):
            counts = torch.zeros(self.num_experts, dtype=torch.int32, device=routed.device)
            counts = counts.scatter_add(0, flat_experts, torch.ones_like(flat_experts, dtype=torch.int32))
            offsets = counts.cumsum(0).to(torch.int32)
            gate, up = _grouped_linear(routed, self.gate_up_proj, offsets).chunk(2, dim=-1)
            expert_out = _grouped_linear(self.act_fn(gate) * up, self.down_proj, offsets)
        elif torch.compiler.is_compiling():
            expert_out = self._batched_forward(routed, sorted_experts)
        else:
            expert_out = self._loop_forward(routed, sorted_experts)
        expert_out = expert_out * topk_weights.flatten()[order].unsqueeze(-1).to(expert_out.dtype)
        out = torch.zeros_like(hidden_states)
        return out.index_add(0, token_idx, expert_out.to(out.dtype))

    def _loop_forward(self, routed: torch.Tensor, sorted_experts: torch.Tensor) -> torch.Tensor:
        """Reference path (one matmul per expert), for devices/dtypes without grouped GEMM."""
        out = routed.new_empty(routed.shape[0], self.down_proj.shape[1])
        bounds = torch.searchsorted(sorted_experts, torch.arange(self.num_experts + 1, device=sorted_experts.device))
        for expert, (start, end) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())):
            if start == end:
                continue
            gate, up = F.linear(routed[start:end], self.gate_up_proj[expert]).chunk(2, dim=-1)
            out[start:end] = F.linear(self.act_fn(gate) * up, self.down_proj[expert])
        return out

    def _batched_forward(self, routed: torch.Tensor, sorted_experts: torch.Tensor) -> torch.Tensor:
        """Graph-friendly path (no data-dependent shapes): each (token, slot) pair against its expert's weights."""
        gate_up = torch.bmm(self.gate_up_proj[sorted_experts], routed.unsqueeze(-1)).squeeze(-1)
        gate, up = gate_up.chunk(2, dim=-1)
        return torch.bmm(self.down_proj[sorted_experts], (self.act_fn(gate) * up).unsqueeze(-1)).squeeze(-1)


class DeepseekV3MoE(nn.Module):
    """y = shared_experts(x) + sum_k g_k * expert_{i_k}(x)."""

    def __init__(self, config):
        super().__init__()
        self.gate = DeepseekV3TopkRouter(config)
        self.experts = DeepseekV3Experts(config)
        self.shared_experts = (
            DeepseekV3MLP(config, intermediate_size=config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        # any parameter: adapter wrappers (peft's ParamWrapper) hold the experts' weights without exposing them
        if any(parameter.is_meta for parameter in self.experts.parameters()):
            raise RuntimeError(EXPERTS_ON_META)
        batch, seq, dim = hidden_states.shape
        flat = hidden_states.reshape(-1, dim)
        routing = self.gate(flat, batch_size=batch)
        out = self.experts(flat, routing.topk_indices, routing.topk_weights).view(batch, seq, dim)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden_states)
        return out, routing
