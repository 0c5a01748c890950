"""PEFT LoRA on the model works at both ends of the supported peft range (.ci/run tests the newest peft and the
declared minimum): adapters attach to the MLA projections, only they train, and merging them changes nothing."""

import pytest
import torch

from deepseek_v3 import DeepseekV3ForCausalLM, load_config

peft = pytest.importorskip("peft")

TARGETS = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]


def test_lora_trains_adapters_only_and_merges_exactly():
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(load_config("tiny"))
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    ids = torch.randint(5, 261, (2, 12), generator=torch.Generator().manual_seed(0))
    lora(ids, labels=ids).loss.backward()

    trained = {n for n, p in lora.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all("lora_" in n for n in trained), sorted(trained)[:5]
    assert {n.split(".")[-4] for n in trained if "lora_A" in n} == set(TARGETS)  # every target got an adapter

    lora.eval()
    with torch.no_grad():
        adapted = lora(ids).logits
        merged = lora.merge_and_unload()(ids).logits
    assert isinstance(merged, torch.Tensor)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
