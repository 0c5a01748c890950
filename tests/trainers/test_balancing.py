"""Unit tests of the aux-loss-free bias update, the load metrics, DP all-reduce and the sequence-wise balance loss."""

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from deepseek_v3.moe import sequence_balance_loss
from deepseek_v3.trainers.balancing import (
    BalancingConfig,
    ExpertLoadBalancer,
    collect_expert_load,
    compute_bias_update,
    dead_expert_fraction,
    find_routers,
    load_entropy,
    max_violation,
    update_expert_bias,
)

from _moe_helpers import tiny_model


def _biases(model) -> torch.Tensor:
    return torch.stack([info.router.e_score_correction_bias.clone() for info in find_routers(model)])


def _set_counts(model, counts: torch.Tensor) -> None:
    for info, row in zip(find_routers(model), counts):
        info.router.tokens_per_expert.copy_(row)


# ---------------------------------------------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------------------------------------------


def test_sign_update_lowers_overloaded_raises_underloaded():
    load = torch.tensor([[10.0, 2.0, 4.0, 0.0], [4.0, 4.0, 4.0, 4.0], [0.0, 0.0, 0.0, 0.0]])  # means 4, 4, 0
    delta = compute_bias_update(load, gamma=0.001, update="sign")
    expected = torch.tensor([[-0.001, 0.001, 0.0, 0.001], [0.0] * 4, [0.0] * 4])
    torch.testing.assert_close(delta, expected)
    # gamma scales the step linearly, sign only depends on the load
    torch.testing.assert_close(compute_bias_update(load, gamma=0.05), 50 * delta)
    assert torch.equal(compute_bias_update(load, gamma=0.0), torch.zeros_like(load))


def test_proportional_update():
    load = torch.tensor([[8.0, 4.0, 0.0, 4.0]])  # mean 4
    delta = compute_bias_update(load, gamma=0.01, update="proportional")
    torch.testing.assert_close(delta, torch.tensor([[-0.01, 0.0, 0.01, 0.0]]))


def test_config_validation_names_bad_value():
    with pytest.raises(ValueError, match="gamma=-0.1"):
        BalancingConfig(gamma=-0.1)
    with pytest.raises(ValueError, match="update='signum'.*'sign', 'proportional'"):
        BalancingConfig(update="signum")
    with pytest.raises(ValueError, match="log_every=0"):
        BalancingConfig(log_every=0)
    cfg = BalancingConfig(gamma=0.001, update_until_step=10)
    assert cfg.gamma_at(10) == 0.001 and cfg.gamma_at(11) == 0.0


def test_metrics_hand_computed():
    load = torch.tensor([[6.0, 2.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0] * 4])
    mv = max_violation(load)
    assert mv[0].item() == pytest.approx(6 / 2 - 1) and mv[1].item() == 0.0 and math.isnan(mv[2])
    ent = load_entropy(load)
    p = torch.tensor([0.75, 0.25])
    assert ent[0].item() == pytest.approx(float(-(p * p.log()).sum() / math.log(4)))
    assert ent[1].item() == pytest.approx(1.0) and math.isnan(ent[2])
    dead = dead_expert_fraction(load)
    assert dead[0].item() == 0.5 and dead[1].item() == 0.0 and math.isnan(dead[2])


def test_update_expert_bias_on_model_fp32_no_grad_and_reset():
    model = tiny_model()
    counts = torch.tensor(
        [[9, 1, 4, 4, 4, 4, 3, 3], [0, 0, 0, 0, 16, 16, 0, 0], [0] * 8], dtype=torch.float32
    )  # third row: the MTP layer did not run this step
    _set_counts(model, counts)
    metrics = update_expert_bias(model, gamma=0.01)
    expected = 0.01 * torch.sign(counts.mean(dim=1, keepdim=True) - counts)
    torch.testing.assert_close(_biases(model), expected)
    for info in find_routers(model):
        bias = info.router.e_score_correction_bias
        assert bias.dtype == torch.float32 and not bias.requires_grad
        assert info.router.tokens_per_expert.sum() == 0  # reset for the next step
    assert metrics["moe/layer_1/maxvio_step"] == pytest.approx(9 / 4 - 1)
    assert metrics["moe/layer_2/maxvio_step"] == pytest.approx(16 / 4 - 1)
    assert math.isnan(metrics["moe/layer_3/maxvio_step"])  # no token: excluded from the means
    assert metrics["moe/maxvio_step"] == pytest.approx(((9 / 4 - 1) + 3) / 2)
    assert metrics["moe/layer_2/dead_expert_fraction"] == 0.75
    assert metrics["moe/bias_range"] == pytest.approx(0.02)
    # the biases are saved in the state dict under the checkpoint name
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in model.state_dict()


def test_balancing_state_stays_fp32_in_bf16_model():
    model = tiny_model()
    _set_counts(model, torch.tensor([[1.0] * 7 + [9.0]] * 3))
    update_expert_bias(model, gamma=0.001)
    model.to(torch.bfloat16)
    for info in find_routers(model):
        assert info.router.e_score_correction_bias.dtype == torch.float32
        assert info.router.tokens_per_expert.dtype == torch.float32
        assert info.router.e_score_correction_bias[0].item() == pytest.approx(0.001, rel=1e-6)


def test_gradient_accumulation_counts_are_summed_then_applied_once():
    model = tiny_model()
    model.train()
    gen = torch.Generator().manual_seed(0)
    micro_batches = [torch.randint(3, 320, (2, 16), generator=gen) for _ in range(3)]
    balancer = ExpertLoadBalancer(BalancingConfig(gamma=0.01))
    balancer.start(model)
    expected = torch.zeros(3, 8)
    for ids in micro_batches:
        out = model(input_ids=ids, labels=ids, output_router_stats=True)
        out.loss.backward()
        expected += out.router_stats.float()
        balancer.micro_batch_end(model)
    assert torch.equal(collect_expert_load(model), expected)  # nothing reset between micro-batches
    balancer.step(model, step=1)
    torch.testing.assert_close(balancer.last_load, expected)
    torch.testing.assert_close(_biases(model), 0.01 * torch.sign(expected.mean(1, keepdim=True) - expected))
    assert expected.sum(dim=1).tolist() == [3 * 2 * 16 * 2] * 3  # K=2 selections per token, MTP layer included
    assert len(balancer.history) == 1  # one update per optimizer step


def test_counts_not_doubled_by_gradient_checkpointing():
    model = tiny_model()
    model.train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(3, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()  # the backward recomputes the MoE forwards
    assert collect_expert_load(model).sum(dim=1).tolist() == [2 * 16 * 2] * 3


def test_gamma_zero_freezes_bias_but_keeps_metrics():
    model = tiny_model()
    _set_counts(model, torch.tensor([[5.0, 3.0] + [0.0] * 6] * 3))
    metrics = update_expert_bias(model, gamma=0.0)
    assert torch.equal(_biases(model), torch.zeros(3, 8))
    assert metrics["moe/maxvio_step"] == pytest.approx(5 / 1 - 1)


def test_bias_update_refused_for_routing_that_ignores_the_bias():
    model = tiny_model(topk_method="group_limited_greedy")
    with pytest.raises(ValueError, match="topk_method='group_limited_greedy'"):
        ExpertLoadBalancer(BalancingConfig(gamma=0.001)).start(model)
    ExpertLoadBalancer(BalancingConfig(gamma=0.0)).start(model)  # metrics only: fine


# ---------------------------------------------------------------------------------------------------------------
# Data parallel: 2 gloo processes
# ---------------------------------------------------------------------------------------------------------------


def _rank_counts(rank: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 + rank)
    return torch.randint(0, 50, (3, 8), generator=gen).float()


def _dp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)  # initializes the gloo process group from the environment
    assert accelerator.num_processes == world_size
    model = tiny_model()
    # 1) synthetic, rank-dependent counts through the plain function with the accelerator
    _set_counts(model, _rank_counts(rank))
    metrics = update_expert_bias(model, gamma=0.01, accelerator=accelerator)
    first = _biases(model)
    # 2) real rank-dependent forwards (2 micro-batches), torch.distributed path, proportional rule
    model.train()
    balancer = ExpertLoadBalancer(BalancingConfig(gamma=0.01, update="proportional"))
    balancer.start(model)
    gen = torch.Generator().manual_seed(rank)
    local = torch.zeros(3, 8)
    for _ in range(2):
        ids = torch.randint(3, 320, (2, 16), generator=gen)
        out = model(input_ids=ids, labels=ids, output_router_stats=True)
        local += out.router_stats.float()
        balancer.micro_batch_end(model)
    balancer.step(model, step=1)
    torch.save(
        {"first": first, "second": _biases(model), "metrics": metrics, "local": local, "global": balancer.last_load},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_data_parallel_all_reduce_gives_identical_biases(tmp_path):
    mp.spawn(_dp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    summed = _rank_counts(0) + _rank_counts(1)
    expected = 0.01 * torch.sign(summed.mean(1, keepdim=True) - summed)
    assert not torch.equal(_rank_counts(0), _rank_counts(1))
    torch.testing.assert_close(r0["first"], expected)
    assert torch.equal(r0["first"], r1["first"])
    assert r0["metrics"] == r1["metrics"]
    # real forwards: different local loads, identical global load and biases, equal to the summed-load update
    assert not torch.equal(r0["local"], r1["local"])
    torch.testing.assert_close(r0["global"], r0["local"] + r1["local"])
    assert torch.equal(r0["second"], r1["second"])
    glob = r0["global"]
    mean = glob.mean(1, keepdim=True)
    torch.testing.assert_close(r0["second"], expected + 0.01 * (mean - glob) / mean)


# ---------------------------------------------------------------------------------------------------------------
# Sequence-wise balance loss (paper eqs. 17-20)
# ---------------------------------------------------------------------------------------------------------------


def test_sequence_balance_loss_hand_computed():
    # One sequence, T=2 tokens, N_r=4 experts, K_r=2.
    #   s_t0 = [0.8, 0.4, 0.4, 0.4] -> s'_t0 = [0.4, 0.2, 0.2, 0.2];  top-2 = {0, 1}
    #   s_t1 = [0.1, 0.9, 0.5, 0.5] -> s'_t1 = [0.05, 0.45, 0.25, 0.25]; top-2 = {1, 2}
    #   P = [0.225, 0.325, 0.225, 0.225];  f = N_r / (K_r T) * counts = 1 * [1, 2, 1, 0]
    #   L = sum f_i P_i = 0.225 + 0.65 + 0.225 = 1.1
    scores = torch.tensor([[0.8, 0.4, 0.4, 0.4], [0.1, 0.9, 0.5, 0.5]])
    topk = torch.tensor([[0, 1], [1, 2]])
    assert sequence_balance_loss(scores, topk, batch_size=1, num_experts=4).item() == pytest.approx(1.1)
    # Second sequence (all tokens on expert 3 with K_r=2 -> f_3 = 4/(2*2)*2 = 2), and the batch mean.
    #   s' = [0.1, 0.1, 0.1, 0.7] for both tokens -> P = [0.1, 0.1, 0.1, 0.7]; counts [0, 0, 2, 2] -> f=[0,0,2,2]
    #   L = 2*0.1 + 2*0.7 = 1.6
    scores2 = torch.tensor([[0.1, 0.1, 0.1, 0.7], [0.2, 0.2, 0.2, 1.4]])
    topk2 = torch.tensor([[3, 2], [2, 3]])
    both = sequence_balance_loss(torch.cat([scores, scores2]), torch.cat([topk, topk2]), batch_size=2, num_experts=4)
    assert both.item() == pytest.approx((1.1 + 1.6) / 2)


def _loop_balance_loss(scores, topk, batch_size, num_experts):
    """Literal transcription of eqs. 17-20 with Python loops."""
    seq_len, top_k = scores.shape[0] // batch_size, topk.shape[1]
    total = 0.0
    for b in range(batch_size):
        rows = range(b * seq_len, (b + 1) * seq_len)
        loss = 0.0
        for i in range(num_experts):
            f_i = num_experts / (top_k * seq_len) * sum(int(i in topk[t].tolist()) for t in rows)
            p_i = sum(float(scores[t, i] / scores[t].sum()) for t in rows) / seq_len
            loss += f_i * p_i
        total += loss
    return total / batch_size


def test_model_balance_loss_matches_equations_and_is_reported_separately():
    alpha = 0.1
    model = tiny_model(seq_aux_loss_alpha=alpha)
    model.train()
    captured = []
    for info in find_routers(model):
        info.router.register_forward_hook(lambda mod, args, out: captured.append((mod, args[0].detach(), out)))
    ids = torch.randint(3, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    assert len(captured) == 3
    expected_total = 0.0
    for router, hidden, routing in captured:
        scores = router.affinities(hidden).detach()
        expected = alpha * _loop_balance_loss(scores, routing.topk_indices, 2, 8)
        assert routing.balance_loss.item() == pytest.approx(expected, rel=1e-5)
        expected_total += expected
    assert out.aux_loss.item() == pytest.approx(expected_total, rel=1e-5)
    cfg = model.config
    torch.testing.assert_close(out.loss, out.main_loss + cfg.mtp_loss_weight * out.mtp_loss + out.aux_loss)
    # the balancer reports it separately (mean over the step's forwards)
    balancer = ExpertLoadBalancer(BalancingConfig(gamma=0.0))
    balancer.start(model)
    out2 = model(input_ids=ids, labels=ids)
    metrics = balancer.step(model, step=1)
    assert metrics["moe/seq_balance_loss"] == pytest.approx(out2.aux_loss.item())
    balancer.stop()


def test_padding_tokens_are_not_counted():
    model = tiny_model()
    model.train()
    ids = torch.randint(3, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, 10:] = 0  # 6 right-padding tokens
    mask[1, :4] = 0  # 4 left-padding tokens
    balancer = ExpertLoadBalancer(BalancingConfig(gamma=0.01))
    balancer.start(model)
    out = model(input_ids=ids, attention_mask=mask, labels=ids, output_router_stats=True)
    counted = collect_expert_load(model)
    assert counted.sum(dim=1).tolist() == [(32 - 10) * 2] * 3
    for layer, routing_counts in enumerate(counted):
        assert routing_counts.sum() < out.router_stats[layer].sum()  # router_stats counts every routed token
    # without mask_padding every routed token counts
    balancer.stop()
    collect_expert_load(model, reset=True)
    other = ExpertLoadBalancer(BalancingConfig(gamma=0.01, mask_padding=False))
    other.start(model)
    model(input_ids=ids, attention_mask=mask, labels=ids)
    assert collect_expert_load(model).sum(dim=1).tolist() == [32 * 2] * 3
    other.stop()


def test_only_forwards_with_autograd_are_counted_by_default():
    model = tiny_model()
    model.train()
    ids = torch.randint(3, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    balancer = ExpertLoadBalancer(BalancingConfig(gamma=0.01))
    balancer.start(model)
    with torch.no_grad():  # e.g. generation / old-policy log-probs in an RL trainer, model in train mode
        model(input_ids=ids, labels=ids)
    assert collect_expert_load(model).sum() == 0
    model(input_ids=ids, labels=ids)
    assert collect_expert_load(model).sum(dim=1).tolist() == [2 * 16 * 2] * 3
    balancer.stop()
    everything = ExpertLoadBalancer(BalancingConfig(gamma=0.01, count_no_grad_forwards=True))
    everything.start(model)
    with torch.no_grad():
        model(input_ids=ids, labels=ids)
    assert collect_expert_load(model).sum(dim=1).tolist() == [2 * 16 * 2] * 3
    everything.stop()
