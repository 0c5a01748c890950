"""The training loss of `DeepseekV3ForCausalLM`: next-token loss + MTP loss + sequence-wise balance loss.

    loss = L_main + mtp_loss_weight * mean_k L_MTP^k + sum_layers alpha * L_Bal

L_main is transformers' causal-LM loss (`model.loss_function`), so `num_items_in_batch` (Trainer's global token
count under gradient accumulation / data parallelism), `ignore_index` and `shift_labels` (context parallelism
passes the already shifted targets) mean what they mean for every transformers model. The MTP depth-k loss targets
token t+k+1 at position t: the (shifted) targets moved k further, with the same loss kwargs. A depth with no target
at all (a sequence of 2 tokens, or a single label at its end) contributes 0, not 0/0.

Data parallelism and gradient accumulation. With `num_items_in_batch` (the targets of the whole optimizer step, all
micro-batches and, with `average_tokens_across_devices`, all ranks) every term must be this micro-batch's share of
the step's loss, because Trainer sums the micro-batches and multiplies by the world size before DDP / FSDP /
ZeRO average the gradients. The main and MTP terms are sums over targets / num_items_in_batch. The balance loss is a
mean over the micro-batch's sequences: it enters as balance_loss * (this micro-batch's targets / num_items_in_batch),
so the step's balance term is the target-weighted mean of the micro-batch values -- the balance loss of the whole
step when micro-batches hold equally many targets (packed pre-training sequences), and in any case counted once,
not once per rank and micro-batch as an unscaled per-micro-batch mean would be.
"""

import torch

# the kwargs of a causal-LM forward that belong to the loss (transformers' `ForCausalLMLoss`)
LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")


def shift_labels_for_mtp(labels: torch.Tensor, depth: int, ignore_index: int = -100) -> torch.Tensor:
    """Labels for MTP depth k: the causal-LM loss shifts by one, so shifting by k more targets token t+k+1."""
    pad = labels.new_full((labels.shape[0], depth), ignore_index)
    return torch.cat((labels[:, depth:], pad), dim=1)


def mtp_depth_loss(loss_function, logits, labels, depth: int, vocab_size: int, **loss_kwargs) -> torch.Tensor:
    """The causal-LM loss of MTP depth `depth` (logits [B, S, V] at position t predict token t+depth+1)."""
    ignore_index = loss_kwargs.get("ignore_index", -100)
    loss_kwargs = dict(loss_kwargs)
    shift_labels = loss_kwargs.pop("shift_labels", None)
    if shift_labels is not None:  # already shifted by one: targets of the main head
        targets = shift_labels_for_mtp(shift_labels, depth, ignore_index)
        valid = (targets != ignore_index).sum()
        kwargs = {"shift_labels": targets}
    else:
        targets = shift_labels_for_mtp(labels, depth, ignore_index)
        valid = (targets[:, 1:] != ignore_index).sum()
        kwargs = {}
    if loss_kwargs.get("num_items_in_batch") is None:
        # a mean over the valid targets, written as sum / count so that no target at all gives 0 (not NaN)
        loss_kwargs["num_items_in_batch"] = valid.clamp(min=1)
    return loss_function(logits=logits, labels=targets, vocab_size=vocab_size, **kwargs, **loss_kwargs)


def causal_lm_loss(
    loss_function,
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    mtp_logits: tuple[torch.Tensor, ...] | None,
    mtp_loss_weight: float,
    balance_loss: torch.Tensor | None,
    **loss_kwargs,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """-> (total loss, main loss, mean MTP loss or None). The balance loss is scaled to this micro-batch's share of
    `num_items_in_batch` when that is given (see the module docstring)."""
    main_loss = loss_function(logits=logits, labels=labels, vocab_size=vocab_size, **loss_kwargs)
    loss = main_loss
    mtp_loss = None
    if mtp_logits and mtp_loss_weight > 0:
        depth_losses = [
            mtp_depth_loss(loss_function, depth_logits, labels, k, vocab_size, **loss_kwargs)
            for k, depth_logits in enumerate(mtp_logits, start=1)
        ]
        mtp_loss = torch.stack(depth_losses).mean()
        loss = loss + mtp_loss_weight * mtp_loss
    if balance_loss is not None:
        balance = balance_loss.to(loss.dtype)
        num_items = loss_kwargs.get("num_items_in_batch")
        if num_items is not None:
            balance = balance * (count_targets(labels, **loss_kwargs) / num_items)
        loss = loss + balance
    return loss, main_loss, mtp_loss


def count_targets(labels: torch.Tensor, ignore_index: int = -100, shift_labels=None, **_) -> torch.Tensor:
    """The next-token targets of this batch, counted as Trainer counts `num_items_in_batch` (labels[:, 1:], or the
    already shifted `shift_labels`)."""
    targets = shift_labels if shift_labels is not None else labels[:, 1:]
    return (targets != ignore_index).sum()
