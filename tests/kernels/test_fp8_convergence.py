"""Must-show 3: the tiny model trained 200 steps with FP8 on vs BF16 mixed precision (same seed and data).

Both runs keep FP32 master weights and run under CPU BF16 autocast; the FP8 run additionally computes every
converted linear / expert GEMM in block-scaled e4m3 (torch backend on CPU, same numerics as the Triton kernels).
Two 200-step runs take ~31 s on one CPU thread, so this runs by default (not marked slow).
"""

import math

import torch

import deepseek_v3
from deepseek_v3.kernels.fp8_training import enable_fp8

VOCAB, STEPS, BATCH, SEQ = 320, 200, 4, 64


def train(fp8: bool, steps: int = STEPS):
    torch.manual_seed(0)
    model = deepseek_v3.DeepseekV3ForCausalLM(deepseek_v3.load_config("tiny"))
    if fp8:
        enable_fp8(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)
        ids[:, 1::2] = (ids[:, 0::2] * 7) % (VOCAB - 3) + 3  # learnable: odd tokens follow from even ones
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), f"non-finite gradient in {name}"
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_fp8_vs_bf16_200_steps():
    bf16, fp8 = train(False), train(True)
    assert all(math.isfinite(x) for x in bf16 + fp8)
    end_bf16, end_fp8 = sum(bf16[-10:]) / 10, sum(fp8[-10:]) / 10
    rel = abs(end_fp8 - end_bf16) / end_bf16
    print(f"loss start {bf16[0]:.4f}/{fp8[0]:.4f}, end (mean of last 10) bf16={end_bf16:.4f} fp8={end_fp8:.4f}, "
          f"relative difference {rel:.4%}")  # fmt: skip
    assert end_bf16 < 0.8 * bf16[0]  # it actually learned something
    assert rel <= 0.01
