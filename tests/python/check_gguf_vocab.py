#!/usr/bin/env python3
"""Reads a GGUF's tokenizer vocabulary with the `gguf` package (llama.cpp's gguf-py) and compares it
with the expected one.

Usage: check_gguf_vocab.py FILE.gguf EXPECTED.json
EXPECTED: {"model": "llama", "tokens": [str], "scores": [float], "types": [int]}; scores are compared
as float32, exactly. Exit 0 when everything matches; otherwise print each difference and exit 1.
"""
import json
import sys

import numpy as np
import gguf


def field(reader, key):
    return reader.fields[key].contents()


def main():
    reader = gguf.GGUFReader(sys.argv[1])
    want = json.load(open(sys.argv[2]))
    failures = []
    if field(reader, "tokenizer.ggml.model") != want["model"]:
        failures.append(f"tokenizer.ggml.model {field(reader, 'tokenizer.ggml.model')!r}, want {want['model']!r}")
    tokens = field(reader, "tokenizer.ggml.tokens")
    scores = np.array(field(reader, "tokenizer.ggml.scores"), dtype=np.float32)
    types = field(reader, "tokenizer.ggml.token_type")
    want_scores = np.array(want["scores"], dtype=np.float32)
    if len(tokens) != len(want["tokens"]) or len(scores) != len(want_scores) or len(types) != len(want["types"]):
        failures.append(f"lengths {len(tokens)}/{len(scores)}/{len(types)}, want {len(want['tokens'])}")
    else:
        for i, (t, s, ty, wt, ws, wty) in enumerate(zip(tokens, scores, types, want["tokens"], want_scores, want["types"])):
            if (t, ty) != (wt, wty) or s != ws:
                failures.append(f"token {i}: ({t!r}, {s}, {ty}), want ({wt!r}, {ws}, {wty})")
                if len(failures) > 10:
                    break
    for f in failures:
        print("FAIL", f)
    if failures:
        sys.exit(1)
    print(f"ok {len(tokens)} tokens, scores and types as expected")


main()
