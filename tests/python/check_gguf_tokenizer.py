#!/usr/bin/env python3
"""Tokenizes texts with the tokenizer transformers builds from a GGUF's metadata and compares the
ids with ferrotune's.

Usage: check_gguf_tokenizer.py FILE.gguf CASES.json
CASES: {"texts": [str], "ids": [[int]], "model_dir": str, "full": {"texts": [str], "ids": [[int]]}}:
"ids" are the ids ferrotune's rebuilt tokenizer.json gives each text (no special tokens added);
"full" the ids ferrotune's pipeline gives with special tokens, which transformers must reproduce
loading the converted model directory ("model_dir") with AutoTokenizer. The GGUF metadata is read with gguf-py and handed to transformers' GGUF
tokenizer builder (`integrations.gguf.gguf_tokenizer_mapping.convert_gguf_tokenizer`, what
`AutoTokenizer.from_pretrained(..., gguf_file=...)` uses, minus its torch-only file reader); it
derives the merges from the piece scores when the file has none. Exit 0 when every text gives the
same ids; otherwise print each difference and exit 1.
"""
import json
import sys

import gguf
from transformers import AutoTokenizer
from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer


def main():
    path, cases_path = sys.argv[1], sys.argv[2]
    cases = json.load(open(cases_path))
    reader = gguf.GGUFReader(path)
    tokenizer_dict = {
        name: reader.fields[f"tokenizer.{key}"].contents()
        for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
        if f"tokenizer.{key}" in reader.fields
    }
    architecture = reader.fields["general.architecture"].contents()
    tokenizer, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    failures = []
    for text, want in zip(cases["texts"], cases["ids"]):
        got = tokenizer.encode(text, add_special_tokens=False).ids
        if got != want:
            failures.append(f"{text!r}: transformers {got}, ferrotune {want}")
    converted = AutoTokenizer.from_pretrained(cases["model_dir"])
    for text, want in zip(cases["full"]["texts"], cases["full"]["ids"]):
        got = converted(text)["input_ids"]
        if got != want:
            failures.append(f"{text!r} (converted directory): transformers {got}, ferrotune {want}")
    for line in failures:
        print(line)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
