"""What transformers makes of ferrotune's data-pipeline test cases (the reference for
host/src/data/hf_parity.rs).

usage: hf_data_parity.py MODEL_DIR CASES.json  →  JSON list on stdout, one entry per case:
  text case  {"text": s}          → {"ids": ...}  the worker's way: tokenizer(s + eos_token)
                                   (TRL adds EOS unless the text already ends with it)
  chat case  {"messages": [...]}  → {"rendered": str, "ids": ..., "assistant_masks": ...}
                                   apply_chat_template, and its {% generation %} assistant mask
"""
import json
import sys

from transformers import AutoTokenizer


def main():
    model_dir, cases_path = sys.argv[1], sys.argv[2]
    tok = AutoTokenizer.from_pretrained(model_dir)
    with open(cases_path, encoding="utf-8") as f:
        cases = json.load(f)
    out = []
    for case in cases:
        if "text" in case:
            text = case["text"]
            if not text.endswith(tok.eos_token):
                text += tok.eos_token
            out.append({"ids": tok(text)["input_ids"]})
        else:
            messages = case["messages"]
            entry = {"rendered": tok.apply_chat_template(messages, tokenize=False)}
            if "generation" in tok.chat_template:
                enc = tok.apply_chat_template(
                    messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
                )
                entry["ids"] = list(enc["input_ids"])
                entry["assistant_masks"] = list(enc["assistant_masks"])
            out.append(entry)
    json.dump(out, sys.stdout, ensure_ascii=False)


if __name__ == "__main__":
    main()
