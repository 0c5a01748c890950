"""The FP8 switch under DDP and FSDP2 (2 CPU processes, gloo): conversion after wrapping, gradients synchronised."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _worker(rank, init_file, mode, result_dir):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import deepseek_v3
    from deepseek_v3.kernels.fp8_training import enable_fp8, fp8_module_names

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = deepseek_v3.DeepseekV3ForCausalLM(deepseek_v3.load_config("tiny"))
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard

            if mode == "fsdp_per_layer":  # the usual recipe: one FSDP unit per decoder layer (MTP layer included)
                for layer in model.model.layers:
                    fully_shard(layer)
            wrapped = fully_shard(model)
        opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-3)
        enable_fp8(wrapped)  # after wrapping and optimizer creation
        names = fp8_module_names(wrapped)
        g = torch.Generator().manual_seed(100 + rank)  # different data per rank
        losses = []
        for _ in range(3):
            ids = torch.randint(3, 320, (2, 16), generator=g)
            loss = wrapped(input_ids=ids, labels=ids).loss
            loss.backward()
            for p in wrapped.parameters():
                grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                assert grad is None or torch.isfinite(grad).all()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        if mode.startswith("fsdp"):
            state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in model.state_dict().items()}
        else:
            state = model.state_dict()
        torch.save({"names": names, "losses": losses, "state": state, "before": before},
                   os.path.join(result_dir, f"{rank}.pt"))  # fmt: skip
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "fsdp_per_layer"])
def test_fp8_under_data_parallel(mode, tmp_path):
    if mode.startswith("fsdp"):
        pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 (fully_shard) not in this torch")
    init_file = tempfile.mktemp(dir=tmp_path)
    mp.start_processes(_worker, args=(init_file, mode, str(tmp_path)), nprocs=WORLD, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in range(WORLD))
    assert r0["names"] and r0["names"] == r1["names"]
    assert "model.layers.1.mlp.experts" in r0["names"] and "lm_head" not in r0["names"]  # wrapper prefix stripped
    assert r0["losses"] != r1["losses"]  # different data per rank ...
    for k, v in r0["state"].items():  # ... yet identical weights: gradients were synchronised
        torch.testing.assert_close(v, r1["state"][k], rtol=0, atol=0, msg=k)
    changed = [k for k, v in r0["state"].items() if not torch.equal(v, r0["before"][k])]
    assert any("experts.gate_up_proj" in k for k in changed) and any("q_a_proj" in k for k in changed)
