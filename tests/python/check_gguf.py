#!/usr/bin/env python3
"""Checks ferrotune's GGUF files with the reference reader, the `gguf` package (llama.cpp's gguf-py).

Usage: check_gguf.py SPEC.json

SPEC: {"model_dir": merged HF model dir (config.json, safetensors, tokenizer files),
       "files": [{"path": GGUF, "ours": raw f32 file (our own dequantization of every tensor,
                  concatenated in file order), "file_type": int, "types": {tensor: type name}}]}

For every file: metadata against config.json / tokenizer.json / tokenizer_config.json; tensor names
and shapes against the HF weights mapped with llama.cpp's names (mapping and Q/K permutation
re-implemented here, independently of the Rust code); types; `gguf.quants.dequantize` of every
tensor against our own dequantization (same blocks, so equal up to float rounding) and against
the original weights (within each type's error budget); and for the types gguf-py can quantize,
`gguf.quants.quantize` of the original weights must equal our bytes exactly.
Exit 0 when all checks pass; otherwise print every failure and exit 1.
"""
import json
import struct
import sys
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q

# Relative RMS error budgets against the merged weights (tiny random model, uniform weights).
BUDGET = {
    "F32": 0.0, "F16": 1e-3, "BF16": 4e-3, "Q8_0": 8e-3, "Q6_K": 0.025, "Q5_0": 0.05, "Q5_1": 0.05,
    "Q5_K": 0.05, "Q4_0": 0.1, "Q4_1": 0.1, "Q4_K": 0.1, "Q3_K": 0.2, "Q2_K": 0.4,
}
# Types whose gguf-py quantizer is a port of ggml's reference quantizer.
PY_QUANTIZABLE = {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1}

failures = []


def check(cond, msg):
    if not cond:
        failures.append(msg)
    return cond


def read_safetensors(model_dir: Path):
    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out = {}
    for name in files:
        raw = (model_dir / name).read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        base = 8 + n
        for key, info in header.items():
            if key == "__metadata__":
                continue
            b, e = info["data_offsets"]
            buf = raw[base + b:base + e]
            if info["dtype"] == "BF16":
                arr = (np.frombuffer(buf, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
            elif info["dtype"] == "F16":
                arr = np.frombuffer(buf, dtype=np.float16).astype(np.float32)
            else:
                arr = np.frombuffer(buf, dtype=np.float32)
            out[key] = arr.reshape(info["shape"])
    return out


def gguf_name(hf: str):
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    parts = hf.split(".")
    layer, module, suffix = parts[2], ".".join(parts[3:-1]), parts[-1]
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    return f"blk.{layer}.{names[module]}.{suffix}"


def permute(w, n_head):
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def field(reader, key):
    f = reader.fields.get(key)
    if f is None:
        return None
    if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
        if f.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode() for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode()
    return f.parts[f.data[0]].tolist()[0]


def check_file(spec, model_dir, config, weights, tok, tok_config):
    path = spec["path"]
    r = gguf.GGUFReader(path)
    arch = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}[config["model_type"]]
    md = lambda k: field(r, k)
    check(md("general.architecture") == arch, f"{path}: general.architecture {md('general.architecture')}")
    check(md("general.file_type") == spec["file_type"], f"{path}: general.file_type {md('general.file_type')} != {spec['file_type']}")
    check(md("general.quantization_version") == 2, f"{path}: general.quantization_version")
    check(md("general.alignment") == 32, f"{path}: general.alignment")
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    for key, want in [("block_count", config["num_hidden_layers"]), ("embedding_length", config["hidden_size"]),
                      ("feed_forward_length", config["intermediate_size"]),
                      ("attention.head_count", config["num_attention_heads"]),
                      ("attention.head_count_kv", config["num_key_value_heads"]),
                      ("context_length", config["max_position_embeddings"]), ("attention.key_length", head_dim)]:
        check(md(f"{arch}.{key}") == want, f"{path}: {arch}.{key} = {md(f'{arch}.{key}')}, want {want}")
    check(np.float32(md(f"{arch}.rope.freq_base")) == np.float32(config["rope_theta"]), f"{path}: rope.freq_base")
    check(np.float32(md(f"{arch}.attention.layer_norm_rms_epsilon")) == np.float32(config["rms_norm_eps"]), f"{path}: rms eps")

    # Tokenizer: every vocabulary entry at its id, padding rows UNUSED, specials CONTROL.
    tokens = md("tokenizer.ggml.tokens")
    types = md("tokenizer.ggml.token_type")
    check(md("tokenizer.ggml.model") == "gpt2", f"{path}: tokenizer.ggml.model {md('tokenizer.ggml.model')}")
    check(len(tokens) == config["vocab_size"] == len(types), f"{path}: {len(tokens)} tokens for vocab_size {config['vocab_size']}")
    vocab = dict(tok["model"]["vocab"])
    for a in tok["added_tokens"]:
        vocab[a["content"]] = a["id"]
    for text, i in vocab.items():
        if not check(tokens[i] == text, f"{path}: token {i} is {tokens[i]!r}, tokenizer.json says {text!r}"):
            break
    for i in range(len(tokens)):
        if i not in vocab.values():
            check(types[i] == 5 and tokens[i] == f"[PAD{i}]", f"{path}: padding token {i} is {tokens[i]!r} type {types[i]}")
    for a in tok["added_tokens"]:
        check(types[a["id"]] == 3, f"{path}: special {a['content']} has type {types[a['id']]}")
    merges = tok["model"]["merges"]
    check(len(md("tokenizer.ggml.merges")) == len(merges), f"{path}: merges count")
    added = {a["content"]: a["id"] for a in tok["added_tokens"]}
    check(md("tokenizer.ggml.bos_token_id") == added[tok_config["bos_token"]], f"{path}: bos id")
    check(md("tokenizer.ggml.eos_token_id") == added[tok_config["eos_token"]], f"{path}: eos id")
    check(md("tokenizer.ggml.padding_token_id") == added[tok_config["pad_token"]], f"{path}: padding id")
    check(md("tokenizer.ggml.add_bos_token") is True, f"{path}: add_bos_token")
    check(md("tokenizer.chat_template") == tok_config["chat_template"], f"{path}: chat_template differs")

    # Tensors: names, shapes, types, values.
    expected = {gguf_name(k): v for k, v in weights.items()}
    found = {t.name: t for t in r.tensors}
    check(set(found) == set(expected), f"{path}: tensors {sorted(set(found) ^ set(expected))} differ")
    ours_all = np.fromfile(spec["ours"], dtype=np.float32)
    offset = 0
    for t in r.tensors:
        want_shape = list(reversed(expected[t.name].shape)) if t.name in expected else None
        check([int(x) for x in t.shape] == want_shape, f"{path}: {t.name} shape {list(t.shape)} != {want_shape}")
        ty = t.tensor_type.name
        if t.name in spec["types"]:
            check(ty == spec["types"][t.name], f"{path}: {t.name} is {ty}, want {spec['types'][t.name]}")
        if len(expected[t.name].shape) == 1 or t.name.endswith("_norm.weight"):
            check(ty == "F32", f"{path}: {t.name} ({expected[t.name].ndim}-D) is {ty}, want F32")
        original = expected[t.name].astype(np.float32)
        if arch == "llama" and (".attn_q." in t.name or ".attn_k." in t.name):
            heads = config["num_attention_heads"] if ".attn_q." in t.name else config["num_key_value_heads"]
            original = permute(original, heads)
        theirs = gguf.quants.dequantize(t.data, t.tensor_type).reshape(original.shape).astype(np.float32)
        n = original.size
        ours = ours_all[offset:offset + n].reshape(original.shape)
        offset += n
        scale = float(np.abs(theirs).max()) or 1.0
        check(np.allclose(ours, theirs, rtol=1e-6, atol=1e-6 * scale), f"{path}: {t.name} ({ty}): our dequantization differs from gguf-py's by {np.abs(ours - theirs).max()}")
        err = float(np.sqrt(np.mean((theirs - original) ** 2) / max(np.mean(original ** 2), 1e-30)))
        check(err <= BUDGET[ty], f"{path}: {t.name} ({ty}) relative RMS error {err:.4g} > {BUDGET[ty]}")
        if t.tensor_type in PY_QUANTIZABLE:
            ref = gguf.quants.quantize(original, t.tensor_type)
            check(np.array_equal(np.asarray(ref).view(np.uint8).ravel(), np.asarray(t.data).view(np.uint8).ravel()),
                  f"{path}: {t.name} ({ty}) bytes differ from gguf.quants.quantize")
    check(offset == ours_all.size, f"{path}: our dequantization has {ours_all.size} values, the file {offset}")


def main():
    spec = json.loads(Path(sys.argv[1]).read_text())
    model_dir = Path(spec["model_dir"])
    config = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    weights = read_safetensors(model_dir)
    for f in spec["files"]:
        check_file(f, model_dir, config, weights, tok, tok_config)
    if failures:
        print("\n".join(failures[:50]))
        print(f"{len(failures)} check(s) failed")
        return 1
    print(f"ok: {len(spec['files'])} GGUF file(s) checked with gguf {getattr(gguf, '__version__', '')}".strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
