#!/usr/bin/env python3
"""Checks ferrotune's PEFT adapter and `--save_method merged_16bit` with transformers + peft, and
both against ferrotune's own model (issue 4, "On the GPU machine").

Usage: check_peft_merged.py FERROTUNE_BINARY WORKDIR [--device cuda|cpu]   (default: cuda if present)

1. Builds a small random Llama in bfloat16 with transformers (initializer_range 0.1, so that a
   random model's next-token losses differ clearly from token to token) and a byte-level BPE
   tokenizer with the `tokenizers` library, and writes a text dataset (train and eval rows).
2. Trains a LoRA adapter with ferrotune on the CPU for a few steps (r 8 on all projections, no
   dropout, learning rate high enough that lora_B moves well away from zero), saving it with
   `--save_method lora`; the eval set is evaluated after the last step, so `trainer_state.json`
   holds OUR mean loss per token of the final adapter on those rows (ferrotune's cpu engine,
   fp32 compute, is its reference implementation).
3. Runs `ferrotune export --save_method merged_16bit`.
4. In float32 on the device:
   - PEFT: `PeftModel.from_pretrained(base, adapter)` loads every lora_A/lora_B tensor of our
     file (none left at its initial value); its loss on the eval rows, tokenized as transformers
     does for SFT text (`tokenizer(text + eos_token)`), equals OUR eval loss (relative 2e-4; the
     same loss without the adapter, and with the EOS token left off, are printed to show how far
     off a wrong adapter or tokenization would be: both must exceed 10x the tolerance);
   - merged: `AutoModelForCausalLM.from_pretrained(merged_16bit)` loads with no missing or
     unexpected keys; every merged tensor equals peft's own `merge_and_unload()` (fp32) rounded
     to bfloat16 (>= 99.9 % identical, none more than one bf16 step apart at the magnitude of
     the merged value or the base weight); its logits equal
     those of peft's merge rounded the same way (relative RMS < 1e-4) and those of base+adapter
     within bf16 rounding of the merged weights (relative RMS < 1e-2); its loss equals OUR eval
     loss within the same rounding (relative 5e-3).
Prints one `ok`/`FAIL` line per check, then `PASS ...` or `FAIL ...`; exits 1 on any failure.
"""
import argparse
import json
import math
import random
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

failures = []
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
LOSS_TOL = 2e-4


def check(cond, msg):
    print(("ok    " if cond else "FAIL  ") + msg, flush=True)
    if not cond:
        failures.append(msg)
    return cond


def rel_rms(a, b):
    return ((a - b).double().pow(2).mean().sqrt() / b.double().pow(2).mean().sqrt()).item()


def texts(n, seed):
    rng = random.Random(seed)
    words = ("the model reads a short line of text and learns which word comes next so that "
             "its loss falls on every step while the adapter grows from zero toward a useful "
             "update of each projection in every layer").split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(6, 24))) for _ in range(n)]


def build_base(base, corpus):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=[BOS, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    bos_id, eos_id = tok.token_to_id(BOS), tok.token_to_id(EOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS)
    fast.save_pretrained(base)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=256, intermediate_size=688,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, initializer_range=0.1, tie_word_embeddings=False,
                         bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(base)


def ferrotune(binary, *args):
    r = subprocess.run([binary, *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stdout[-4000:], r.stderr[-4000:], sep="\n")
    return r


def logits_of(model, rows, device):
    """Per-row logits (fp32) of `rows`, concatenated along the positions."""
    with torch.no_grad():
        return torch.cat([model(input_ids=torch.tensor([ids], device=device)).logits[0] for ids in rows])


def mean_loss(model, rows, device):
    """Mean cross-entropy per predicted token over `rows` (lists of ids), each row alone."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in rows:
            x = torch.tensor([ids], device=device)
            logits = model(input_ids=x).logits[0, :-1].double()
            total += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            count += len(ids) - 1
    return total / count


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ferrotune")
    ap.add_argument("work", type=Path)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    work, device = args.work, args.device
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here
    work.mkdir(parents=True, exist_ok=True)
    base, adapter, merged, ck = (work / n for n in ("base", "adapter", "merged16", "ck"))
    for d in (base, adapter, merged, ck):
        shutil.rmtree(d, ignore_errors=True)  # a rerun starts afresh (no resume, no stale shards)
    corpus = texts(200, 1)
    build_base(base, corpus)
    train_rows, eval_rows = corpus[:160], corpus[160:176]
    for name, rows in (("train.jsonl", train_rows), ("eval.jsonl", eval_rows)):
        (work / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))

    steps = 8
    r = ferrotune(args.ferrotune, "--model_name", base, "--dataset", work / "train.jsonl", "--formatter", "text",
                  "--eval_dataset", work / "eval.jsonl", "--output_dir", ck, "--save_path", adapter,
                  "--save_model", "--save_method", "lora", "--device", "cpu", "--max_seq_length", 128,
                  "--r", 8, "--lora_alpha", 16, "--lora_dropout", 0, "--per_device_train_batch_size", 4,
                  "--per_device_eval_batch_size", 4, "--max_steps", steps, "--learning_rate", "1e-2",
                  "--warmup_steps", 0, "--logging_steps", steps, "--save_steps", steps, "--seed", 7)
    if not check(r.returncode == 0, f"ferrotune trains {steps} steps on the cpu and saves the adapter"):
        return
    history = json.loads((ck / "trainer_state.json").read_text())["log_history"]
    ours = [e for e in history if "eval_loss" in e and e.get("step") == steps]
    if not check(len(ours) == 1, f"trainer_state.json has the eval loss after step {steps}: {ours}"):
        return
    ours = ours[0]["eval_loss"]
    r = ferrotune(args.ferrotune, "export", "--adapter", adapter, "--base", base,
                  "--save_method", "merged_16bit", "--save_path", merged)
    if not check(r.returncode == 0, "ferrotune export --save_method merged_16bit"):
        return

    tok = AutoTokenizer.from_pretrained(base)
    rows = [tok(t + tok.eos_token)["input_ids"] for t in eval_rows]
    rows_no_eos = [tok(t)["input_ids"] for t in eval_rows]
    check(all(r[0] == tok.bos_token_id and r[-1] == tok.eos_token_id for r in rows),
          "eval rows are BOS … EOS as transformers tokenizes SFT text")

    # (1) base + our adapter through peft.
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device)
    base_loss = mean_loss(model, rows, device)
    peft_model = PeftModel.from_pretrained(model, adapter).to(device).eval()
    ours_file = load_file(adapter / "adapter_model.safetensors")
    params = dict(peft_model.named_parameters())
    mismatched, loaded = [], 0
    for key, value in ours_file.items():
        name = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        p = params.get(name)
        if p is None or p.shape != value.shape or not torch.equal(p.detach().cpu().float(), value.float()):
            mismatched.append(key)
        loaded += 1
    lora_params = [n for n in params if ".lora_" in n]
    check(not mismatched and loaded == len(lora_params) and loaded == 2 * 7 * 2,
          f"peft loads all {loaded} adapter tensors unchanged ({len(lora_params)} LoRA parameters; mismatched: {mismatched[:3]})")
    b_norm = min(v.float().norm().item() for k, v in ours_file.items() if "lora_B" in k)
    check(b_norm > 1e-3, f"every lora_B moved away from zero in training (smallest norm {b_norm:.3e})")
    peft_loss = mean_loss(peft_model, rows, device)
    peft_no_eos = mean_loss(peft_model, rows_no_eos, device)
    rel = abs(peft_loss - ours) / ours
    check(rel < LOSS_TOL, f"loss of base+adapter (peft) {peft_loss:.6f} vs ours {ours:.6f}: relative {rel:.2e} (tol {LOSS_TOL:.0e})")
    sens_adapter, sens_eos = abs(base_loss - ours) / ours, abs(peft_no_eos - ours) / ours
    check(min(sens_adapter, sens_eos) > 10 * LOSS_TOL,
          f"the check can fail: without the adapter {base_loss:.6f} (relative {sens_adapter:.2e}), "
          f"without EOS {peft_no_eos:.6f} (relative {sens_eos:.2e})")
    logits_peft = logits_of(peft_model, rows, device)

    # Peft's own merge, fp32, rounded to the stored dtype as a merged_16bit save must be.
    ref = {k: v.detach().to(torch.bfloat16).cpu() for k, v in peft_model.merge_and_unload().state_dict().items()}
    del peft_model, model

    # (2) our merged_16bit save through transformers.
    m16, info = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32, output_loading_info=True)
    m16 = m16.to(device).eval()
    missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    check(not missing and not unexpected,
          f"merged_16bit loads with no missing ({missing[:3]}) or unexpected ({unexpected[:3]}) keys")
    ours_merged = {}
    for f in sorted(merged.glob("*.safetensors")):
        ours_merged.update(load_file(f))
    check(sorted(ours_merged) == sorted(ref), f"merged save has peft's tensor names ({len(ours_merged)} vs {len(ref)})")
    not_bf16 = [k for k, v in ours_merged.items() if v.dtype != torch.bfloat16]
    check(not not_bf16, f"every merged tensor is stored in the base's bfloat16 ({not_bf16[:3]})")
    base_weights = {}
    for f in sorted(base.glob("*.safetensors")):
        base_weights.update(load_file(f))
    worst_same, worst_steps, compared = 1.0, 0.0, 0
    for k, want in ref.items():
        got = ours_merged.get(k)
        if got is None or got.dtype != torch.bfloat16:
            continue
        same = (got.view(torch.int16) == want.view(torch.int16)).float().mean().item()
        # One bf16 step at the magnitude of the merged value or of the base weight, whichever is
        # larger: where W + delta nearly cancels, fp32 sums in another order differ in the last
        # fp32 bits of W's magnitude, which are several bf16 steps of the tiny result.
        scale = torch.maximum(want.float().abs(), base_weights[k].float().abs())
        step = torch.ldexp(torch.ones_like(scale), torch.frexp(scale)[1] - 8).clamp_min(2.0 ** -133)
        steps_apart = ((got.float() - want.float()).abs() / step).max().item()
        worst_same, worst_steps = min(worst_same, same), max(worst_steps, steps_apart)
        compared += 1
    check(worst_same >= 0.999 and worst_steps <= 1.0,
          f"{compared} merged tensors equal peft's merge_and_unload rounded to bf16: worst tensor "
          f"{worst_same:.5f} identical, at most {worst_steps:.2f} bf16 steps apart")
    ref_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    ref_model.load_state_dict({k: v.float() for k, v in ref.items()})
    ref_model = ref_model.to(device).eval()
    logits_m16, logits_ref = logits_of(m16, rows, device), logits_of(ref_model, rows, device)
    e_ref, e_peft = rel_rms(logits_m16, logits_ref), rel_rms(logits_m16, logits_peft)
    check(e_ref < 1e-4, f"merged_16bit logits vs peft's merge rounded to bf16: relative RMS {e_ref:.2e} (tol 1e-4)")
    check(e_peft < 1e-2, f"merged_16bit logits vs base+adapter (peft, unrounded): relative RMS {e_peft:.2e} (tol 1e-2)")
    m16_loss = mean_loss(m16, rows, device)
    rel16 = abs(m16_loss - ours) / ours
    check(rel16 < 5e-3, f"loss of merged_16bit {m16_loss:.6f} vs ours {ours:.6f}: relative {rel16:.2e} (tol 5e-3)")
    check(math.isfinite(m16_loss), "merged loss is finite")


if __name__ == "__main__":
    main()
    if failures:
        print(f"FAIL {len(failures)} check(s) failed")
        sys.exit(1)
    print("PASS our adapter loads with peft and our merged_16bit with transformers; both give our loss")
