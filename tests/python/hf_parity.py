"""Ladder step 3 (DESIGN §2): the cuda engine's loss and LoRA gradients vs transformers + peft.

Reads the bundle `cargo test --test cuda_parity` writes with FERROTUNE_PARITY_OUT=DIR: the random
Llama (DIR/model), the adapter (DIR/adapter_model.safetensors, PEFT names), the batch, our loss
sum and gradients (DIR/batch.json, DIR/ours_grads.safetensors). Runs the same step in PyTorch
(bf16 base weights, fp32 adapters under bf16 autocast, as Unsloth/PEFT train) and prints the
relative L2 error per gradient; exits 1 if the loss differs by more than 1% or any gradient by
more than 5% (bf16 activations on both sides, different kernels).

    python3 tests/python/hf_parity.py DIR
"""
import json
import sys

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def main(d):
    meta = json.load(open(f"{d}/batch.json"))
    model = AutoModelForCausalLM.from_pretrained(f"{d}/model", torch_dtype=torch.bfloat16).cuda()
    cfg = LoraConfig(r=meta["r"], lora_alpha=meta["lora_alpha"], target_modules=meta["target_modules"],
                     lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    adapter = load_file(f"{d}/adapter_model.safetensors")
    params = dict(model.named_parameters())
    for name, value in adapter.items():
        key = name.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        p = params[key]
        with torch.no_grad():
            p.data = value.to(device=p.device, dtype=torch.float32)
    b, t = meta["batch"], meta["seq"]
    ids = torch.tensor(meta["input_ids"], device="cuda").view(b, t)
    targets = torch.tensor(meta["targets"], device="cuda").view(-1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(input_ids=ids).logits
    loss_sum = torch.nn.functional.cross_entropy(logits.float().view(b * t, -1), targets, ignore_index=-100, reduction="sum")
    (loss_sum * meta["scale"]).backward()
    ours = load_file(f"{d}/ours_grads.safetensors")
    ok = True
    rel_loss = abs(loss_sum.item() - meta["loss_sum"]) / loss_sum.item()
    print(f"loss_sum hf {loss_sum.item():.6f} ferrotune {meta['loss_sum']:.6f} rel {rel_loss:.2e}")
    ok &= rel_loss < 1e-2
    worst = 0.0
    for name, g in ours.items():
        key = name.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        ref = params[key].grad.float().cpu()
        err = ((g - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        worst = max(worst, err)
        if err > 5e-2:
            ok = False
            print(f"FAIL {name}: relative L2 error {err:.3e}")
    print(f"{len(ours)} LoRA gradients: worst relative L2 error vs HF+PEFT {worst:.3e} (tol 5e-2)")
    print("HF_PARITY " + ("PASS" if ok else "FAIL"))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main(sys.argv[1])
