#!/usr/bin/env python3
"""Checks that ferrotune loads real bitsandbytes 4-bit checkpoints as a base model (needs a CUDA GPU).

Usage: check_bnb4_base.py FERROTUNE_BINARY WORKDIR

1. Builds a small random Llama in bfloat16 with transformers and saves it; saves a PEFT LoRA adapter
   for it with peft's default initialisation (lora_B = 0, so merging adds exactly nothing).
2. Loads the model with transformers + bitsandbytes in 4 bit (NF4, blocksize 64, compute bfloat16),
   once with double quantisation and once without, and saves each with save_pretrained: two real
   `*-bnb-4bit` checkpoints written by bitsandbytes itself.
3. For each: `ferrotune export --base <4-bit checkpoint> --adapter <adapter> --save_method
   merged_16bit` must give, for every Linear4bit weight, exactly (bit for bit) what
   `bitsandbytes.functional.dequantize_4bit(weight, quant_state)` gives, and every other tensor
   exactly the checkpoint's; the saved config.json has no quantization_config.
4. For each: `ferrotune bench --model_name <4-bit checkpoint> --device cuda` (no --load_in_4bit: a
   pre-quantised base implies it) trains a few steps on the GPU with finite losses.
Exit 0 when every check passes; otherwise print each failure and exit 1.
"""
import json
import subprocess
import sys
from pathlib import Path

import torch
import bitsandbytes as bnb
import bitsandbytes.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model

failures = []


def check(cond, msg):
    print(("ok    " if cond else "FAIL  ") + msg)
    if not cond:
        failures.append(msg)
    return cond


def merged_tensors(directory):
    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def main():
    ferrotune, work = sys.argv[1], Path(sys.argv[2])
    work.mkdir(parents=True, exist_ok=True)
    base, adapter = work / "base", work / "adapter"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1408, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(base)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets)).save_pretrained(adapter)

    for double_quant in (True, False):
        tag = "double-quant" if double_quant else "plain-absmax"
        q4 = work / f"base-bnb-4bit-{tag}"
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.bfloat16)
        m4 = AutoModelForCausalLM.from_pretrained(base, quantization_config=qc, dtype=torch.bfloat16,
                                                  device_map="cuda")
        m4.save_pretrained(q4)
        out = work / f"merged16-{tag}"
        r = subprocess.run([ferrotune, "export", "--base", str(q4), "--adapter", str(adapter),
                            "--save_method", "merged_16bit", "--save_path", str(out)],
                           capture_output=True, text=True)
        if not check(r.returncode == 0, f"{tag}: ferrotune export from the bitsandbytes checkpoint"):
            print(r.stderr)
            continue
        saved = merged_tensors(out)
        stored = merged_tensors(q4)
        linear4 = {n: m for n, m in m4.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        check(len(linear4) == 7 * config.num_hidden_layers, f"{tag}: {len(linear4)} Linear4bit modules")
        exact = 0
        for name, mod in linear4.items():
            want = F.dequantize_4bit(mod.weight.data, mod.weight.quant_state).cpu()
            got = saved[f"{name}.weight"]
            same = got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
            exact += same
            if not same:
                diff = (got.float() - want.float()).abs().max().item() if got.shape == want.shape else None
                check(False, f"{tag}: {name}.weight differs from dequantize_4bit (max |diff| {diff})")
        check(exact == len(linear4), f"{tag}: {exact}/{len(linear4)} weights bit-identical to dequantize_4bit")
        others = [n for n in stored if not any(n.startswith(f"{m}.weight") for m in linear4)]
        same_others = all(torch.equal(saved[n], stored[n]) for n in others)
        check(same_others and len(others) > 0, f"{tag}: {len(others)} 16-bit tensors saved unchanged")
        cfg = json.loads((out / "config.json").read_text())
        check("quantization_config" not in cfg, f"{tag}: merged_16bit config.json has no quantization_config")

        r = subprocess.run([ferrotune, "bench", "--model_name", str(q4), "--device", "cuda",
                            "--per_device_train_batch_size", "2", "--max_seq_length", "128",
                            "--warmup_steps", "1", "--steps", "3"], capture_output=True, text=True)
        line = next((l for l in r.stdout.splitlines() if l.startswith("RESULT ")), None)
        if check(r.returncode == 0 and line is not None, f"{tag}: ferrotune bench on the GPU"):
            result = json.loads(line[len("RESULT "):])
            losses = result["losses"]
            check(all(l == l and abs(l) < 1e4 for l in losses), f"{tag}: GPU losses {losses}")
            check(result.get("load_in_4bit") is True, f"{tag}: bench reports the base as 4-bit (as loaded)")
            print(f"      {tag}: {result}")
        else:
            print(r.stderr[-3000:])
        del m4
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
    if failures:
        print(f"{len(failures)} check(s) failed")
        sys.exit(1)
    print("PASS real bitsandbytes 4-bit checkpoints load as ferrotune base models")
