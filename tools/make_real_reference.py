#!/usr/bin/env python3
"""Oracle values for the real-model tests, from transformers loading the same GGUF files:
  reference/tokens.json                ids of every Rotten Tomatoes test text and every SMS text
  reference/logits.safetensors         logits at every position of a few sentences (no prompt)
  reference-gemma3/tokens.json         the same texts through Gemma 3's tokenizer
  reference-gemma3/logits.safetensors  logits of a few texts at chosen positions, one text longer
                                       than the model's 512-position sliding window
  reference-gemma3/dequant.safetensors the first 4096 values of every tensor of the Gemma file as
                                       gguf-py dequantizes it (F32, Q8_0, Q5_0, Q4_K, Q6_K)
written into the assets folder (.cache/assets or $SOFTPROMPT_ASSETS). Run after fetch_assets.py:
  .venv/bin/python tools/make_real_reference.py
A reference newer than its GGUF file and this script is kept (nothing to redo).
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
ASSETS = os.environ.get("SOFTPROMPT_ASSETS", os.path.join(ROOT, ".cache", "assets"))
SENTENCES = [
    "The capital of France is",
    "Review: a gripping, beautifully shot film.\nIs this movie review positive or negative? Answer:",
    "WINNER!! You have been selected to receive a £900 prize reward! Call 09061701461 now.",
]
# (gguf file, output folder, logits at every position?)
MODELS = [
    ("SmolLM2-135M-Instruct.Q4_1.gguf", "reference", True),
    ("gemma-3-270m-q4_k_m.gguf", "reference-gemma3", False),
]


def texts(path):
    return [json.loads(l)["text"] for l in open(path) if l.strip()]


def long_text(tok, min_tokens=640):
    """Rotten Tomatoes test reviews joined until the text passes `min_tokens` tokens."""
    parts = []
    for t in texts(os.path.join(ASSETS, "rotten-tomatoes", "test.jsonl")):
        parts.append(t)
        if len(tok(" ".join(parts))["input_ids"]) > min_tokens:
            return " ".join(parts)
    sys.exit("not enough text for the long reference")


def up_to_date(outputs, inputs):
    return all(os.path.exists(o) for o in outputs) and min(os.path.getmtime(o) for o in outputs) > max(
        os.path.getmtime(i) for i in inputs)


def reference(gguf, folder, every_position, all_texts):
    out = os.path.join(ASSETS, folder)
    files = [os.path.join(out, "tokens.json"), os.path.join(out, "logits.safetensors")]
    if up_to_date(files, [os.path.join(ASSETS, gguf), os.path.abspath(__file__)]):
        print(f"{out}: up to date")
        return
    os.makedirs(out, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(ASSETS, gguf_file=gguf)
    ids = [tok(t)["input_ids"] for t in all_texts]
    with open(files[0], "w") as f:
        json.dump({"texts": all_texts, "ids": ids}, f)
    model = AutoModelForCausalLM.from_pretrained(ASSETS, gguf_file=gguf, dtype=torch.float32)
    model.eval()
    sentences = SENTENCES if every_position else SENTENCES + [long_text(tok)]
    tensors = {}
    with torch.no_grad():
        for i, s in enumerate(sentences):
            x = torch.tensor([tok(s)["input_ids"]])
            logits = model(input_ids=x).logits[0]
            n = logits.shape[0]
            # a 262,144-word vocabulary: keep the last 8 positions and every 64th
            at = list(range(n)) if every_position else sorted(set(range(0, n, 64)) | set(range(max(0, n - 8), n)))
            tensors[f"ids_{i}"] = x[0].to(torch.int64)
            tensors[f"positions_{i}"] = torch.tensor(at, dtype=torch.int64)
            tensors[f"logits_{i}"] = logits[at].contiguous()
    save_file(tensors, files[1])
    print(f"{out}: {len(all_texts)} tokenized texts, {len(sentences)} logit references "
          f"({', '.join(str(len(tensors[f'ids_{i}'])) for i in range(len(sentences)))} tokens)")


def dequant_reference(gguf, folder):
    from gguf import GGUFReader
    from gguf.quants import dequantize
    out = os.path.join(ASSETS, folder, "dequant.safetensors")
    if up_to_date([out], [os.path.join(ASSETS, gguf), os.path.abspath(__file__)]):
        return
    reader = GGUFReader(os.path.join(ASSETS, gguf))
    tensors = {}
    for t in reader.tensors:
        values = dequantize(t.data, t.tensor_type).reshape(-1)
        tensors[t.name] = torch.from_numpy(values[:4096].astype("float32").copy())
        tensors[t.name + ".count"] = torch.tensor([values.size], dtype=torch.int64)
    save_file(tensors, out)
    print(f"{out}: {len(reader.tensors)} tensors")


def main():
    all_texts = texts(os.path.join(ASSETS, "rotten-tomatoes", "test.jsonl"))
    for split in ["train", "dev", "test"]:
        all_texts += texts(os.path.join(ASSETS, "sms-spam", f"{split}.jsonl"))
    for gguf, folder, every_position in MODELS:
        reference(gguf, folder, every_position, all_texts)
    dequant_reference(*MODELS[1][:2])


if __name__ == "__main__":
    main()
