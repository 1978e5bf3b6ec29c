#!/usr/bin/env python3
"""Generates the small test fixtures of softprompt with Hugging Face transformers + PEFT as oracles.

For each tiny random model (Llama with tied head and GQA, Qwen2 with q/k/v bias and an untied
head, GPT-2, Gemma 3 with sliding-window layers narrower than a fixture row, Mistral with its
window) it writes, under
tests/fixtures/<name>/:
  config.json, model.safetensors, tokenizer.json   the model in Hugging Face layout
  reference.safetensors                              ids, masks, prompts, logits, loss, gradient
  peft-prompt/                                       the same prompt saved by PEFT's save_pretrained
  prefix-reference.safetensors                       key/value prefixes, their logits, loss, gradient
                                                     (PEFT's prefix tuning; `--prefix-references`
                                                     rewrites only these)
  tests/fixtures/tiny-llama.gguf                     tiny-llama as llama.cpp's converter writes it
                                                     (`--gguf` rewrites only it)
Run through tools/setup-python.sh's environment:  .venv/bin/python tools/make_fixtures.py [NAME ...]
(names limit the run to those models; the shared tokenizer is rebuilt identically either way).
Everything is seeded; rerunning reproduces the files (up to safetensors metadata ordering).
"""
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)
from peft import PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
N_VIRTUAL = 3

CORPUS = [
    "Review: a gripping, beautifully shot film.\nSentiment: positive",
    "Review: dull and far too long.\nSentiment: negative",
    "the movie was great and the actors were wonderful",
    "the plot was boring, the dialogue flat, the ending worse",
    "Is this movie review positive or negative? Answer: positive",
    "Is this movie review positive or negative? Answer: negative",
    "free entry in a weekly competition, text WIN now to claim your prize",
    "ok see you at home later, I will bring the keys",
    "0123456789 !?.,;:'\"()-",
] * 20


def make_tokenizer(path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(path)
    return tok


def build(name, vocab):
    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if name == "tiny-llama":
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                          tie_word_embeddings=True, initializer_range=0.2, **common)
        return LlamaForCausalLM(cfg)
    if name == "tiny-qwen2":
        cfg = Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=1, max_position_embeddings=128, rms_norm_eps=1e-6,
                          rope_theta=1_000_000.0, tie_word_embeddings=False, initializer_range=0.2, **common)
        return Qwen2ForCausalLM(cfg)
    if name == "tiny-gpt2":
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, initializer_range=0.2,
                         **{k: v for k, v in common.items() if k != "pad_token_id"})
        return GPT2LMHeadModel(cfg)
    if name == "tiny-mistral":
        # Mistral's sliding window (every layer), narrower than a fixture row
        cfg = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, sliding_window=12,
                            tie_word_embeddings=False, initializer_range=0.2, **common)
        return MistralForCausalLM(cfg)
    if name == "tiny-gemma3":
        # a window of 4 positions: the fixture rows (3 virtual tokens + up to ~10 tokens) cross it;
        # the query scale differs from 1/sqrt(head_dim); two RoPE bases
        cfg = Gemma3TextConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=12, sliding_window=4,
                               layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                            "sliding_attention"],
                               rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}},
                               max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=True,
                               initializer_range=0.2, **common)
        return Gemma3ForCausalLM(cfg)
    raise ValueError(name)


def randomize_norms(model, gen):
    # HF initialises norm weights to 1 and biases to 0; random values exercise them in the tests.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or "ln_" in n or n.endswith(".bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def main():
    os.makedirs(ROOT, exist_ok=True)
    tok_path = os.path.join(ROOT, "tokenizer.json")
    tok = make_tokenizer(tok_path)
    vocab = tok.get_vocab_size()
    texts = ["Review: dull and far too long.\nSentiment:", " negative", "the actors were wonderful", " great"]
    tok_ref = {"texts": texts + CORPUS[:9], "ids": [tok.encode(t).ids for t in texts + CORPUS[:9]], "vocab_size": vocab}
    with open(os.path.join(ROOT, "tokenizer_reference.json"), "w") as f:
        json.dump(tok_ref, f, indent=1)

    names = sys.argv[1:] or ["tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-gemma3", "tiny-mistral"]
    for name in names:
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(1)
        model = build(name, vocab)
        randomize_norms(model, gen)
        model.eval()
        out = os.path.join(ROOT, name)
        shutil.rmtree(out, ignore_errors=True)
        model.save_pretrained(out, safe_serialization=True)
        shutil.copy(tok_path, os.path.join(out, "tokenizer.json"))
        model = model.double()
        d = model.config.hidden_size

        # two rows of different lengths, right padded; targets are the last tokens of each row
        ctx0, tgt0 = tok.encode(texts[0]).ids, tok.encode(texts[1]).ids
        ctx1, tgt1 = tok.encode(texts[2]).ids, tok.encode(texts[3]).ids
        rows = [(ctx0, tgt0), (ctx1, tgt1)]
        T = max(len(c) + len(t) for c, t in rows)
        ids = torch.zeros((2, T), dtype=torch.long)
        attn = torch.zeros((2, T), dtype=torch.long)
        labels = torch.full((2, T), -100, dtype=torch.long)
        for r, (c, t) in enumerate(rows):
            seq = c + t
            ids[r, : len(seq)] = torch.tensor(seq)
            attn[r, : len(seq)] = 1
            labels[r, len(c) : len(seq)] = torch.tensor(t)
        prompts = 0.5 * torch.randn((2, N_VIRTUAL, d), generator=gen, dtype=torch.float64)

        # logits of each row alone, unpadded, with its own prompt: inputs_embeds = [prompt][tokens]
        emb = model.get_input_embeddings()
        ref = {}
        with torch.no_grad():
            for r, (c, t) in enumerate(rows):
                seq = torch.tensor([c + t])
                x = torch.cat([prompts[r : r + 1], emb(seq)], dim=1)
                ref[f"logits_row{r}"] = model(inputs_embeds=x).logits[0].contiguous()

        # loss and gradient of prompt 0 over both rows, through PEFT itself
        cfg = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=N_VIRTUAL)
        peft_model = get_peft_model(model, cfg)
        enc = peft_model.prompt_encoder["default"].embedding
        with torch.no_grad():
            enc.weight.copy_(prompts[0])
        enc.weight.grad = None
        loss = peft_model(input_ids=ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        ref["loss"] = loss.detach().reshape(1)
        ref["grad"] = enc.weight.grad.detach().clone()
        ref["input_ids"] = ids.to(torch.int64)
        ref["attention_mask"] = attn.to(torch.int64)
        ref["labels"] = labels.to(torch.int64)
        ref["prompts"] = prompts
        ref["context_lens"] = torch.tensor([len(ctx0), len(ctx1)], dtype=torch.int64)
        save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(out, "reference.safetensors"))

        # the prompt as PEFT saves it (f32 prompt_embeddings [N, d])
        peft_model = peft_model.float()
        peft_model.save_pretrained(os.path.join(out, "peft-prompt"))
        print(f"{name}: vocab {vocab}, d {d}, loss {loss.item():.6f}, |grad| {ref['grad'].norm().item():.6f}")

    # a sharded copy of tiny-llama exercises model.safetensors.index.json
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = build("tiny-llama", vocab)
    randomize_norms(model, gen)
    sharded = os.path.join(ROOT, "tiny-llama-sharded")
    shutil.rmtree(sharded, ignore_errors=True)
    model.save_pretrained(sharded, safe_serialization=True, max_shard_size="40KB")
    shutil.copy(tok_path, os.path.join(sharded, "tokenizer.json"))
    print("shards:", sorted(os.listdir(sharded)))




def make_prefix_reference(name):
    """prefix-reference.safetensors beside a fixture: two key/value prefixes (PEFT's
    `[N, layers * 2 * kv_heads * head_dim]`), each row's logits under its own prefix, and the loss
    and gradient of prefix 0 over the reference rows, all through PEFT's prefix tuning (f64)."""
    out = os.path.join(ROOT, name)
    ref = load_file(os.path.join(out, "reference.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64)
    model.eval()
    cfg = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=N_VIRTUAL)
    peft_model = get_peft_model(model, cfg)
    peft_model.eval()
    enc = peft_model.prompt_encoder["default"].embedding
    width = enc.weight.shape[1]
    gen = torch.Generator().manual_seed(2)
    prefixes = 0.5 * torch.randn((2, N_VIRTUAL, width), generator=gen, dtype=torch.float64)
    ids, attn, labels = ref["input_ids"], ref["attention_mask"], ref["labels"]
    result = {"prefixes": prefixes}
    with torch.no_grad():
        for r in range(2):
            enc.weight.copy_(prefixes[r])
            n = int(attn[r].sum())
            seq = ids[r : r + 1, :n]
            result[f"logits_row{r}"] = peft_model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[0].contiguous()
        enc.weight.copy_(prefixes[0])
    enc.weight.grad = None
    loss = peft_model(input_ids=ids, attention_mask=attn, labels=labels).loss
    loss.backward()
    result["loss"] = loss.detach().reshape(1)
    result["grad"] = enc.weight.grad.detach().clone()
    save_file({k: v.contiguous() for k, v in result.items()}, os.path.join(out, "prefix-reference.safetensors"))
    print(f"{name}: prefix width {width}, loss {loss.item():.6f}, |grad| {result['grad'].norm().item():.6f}")


def make_gguf_fixture():
    """tiny-llama.gguf: the tiny-llama fixture as llama.cpp's converter writes it (F32 tensors
    under llama.cpp names, Q/K rows permuted for its RoPE, llama metadata; no vocabulary, so the
    vocabulary size comes from token_embd): the GGUF reader's fuzz seed and a parity check."""
    import gguf
    import numpy as np
    src = os.path.join(ROOT, "tiny-llama")
    cfg = json.load(open(os.path.join(src, "config.json")))
    w = {k: v.numpy() for k, v in load_file(os.path.join(src, "model.safetensors")).items()}
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def permute(x, n_head):
        return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    out = os.path.join(ROOT, "tiny-llama.gguf")
    wr = gguf.GGUFWriter(out, "llama")
    wr.add_block_count(cfg["num_hidden_layers"])
    wr.add_embedding_length(cfg["hidden_size"])
    wr.add_feed_forward_length(cfg["intermediate_size"])
    wr.add_head_count(heads)
    wr.add_head_count_kv(kv)
    wr.add_context_length(cfg["max_position_embeddings"])
    wr.add_rope_dimension_count(cfg["head_dim"])
    wr.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    wr.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    wr.add_tensor("token_embd.weight", w["model.embed_tokens.weight"].astype(np.float32))
    wr.add_tensor("output_norm.weight", w["model.norm.weight"].astype(np.float32))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for g, h in [("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"),
                     ("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
                     ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")]:
            wr.add_tensor(f"blk.{i}.{g}.weight", w[p + h + ".weight"].astype(np.float32))
        wr.add_tensor(f"blk.{i}.attn_q.weight", permute(w[p + "self_attn.q_proj.weight"], heads).astype(np.float32))
        wr.add_tensor(f"blk.{i}.attn_k.weight", permute(w[p + "self_attn.k_proj.weight"], kv).astype(np.float32))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    print("tiny-llama.gguf:", os.path.getsize(out), "bytes")


def make_toy_sentiment(seed=0):
    """A small learnable sentiment task over the fixture tokenizer's words (label set by keywords)."""
    import random
    rng = random.Random(seed)
    good = ["great", "wonderful", "gripping", "beautifully shot"]
    bad = ["boring", "dull", "flat", "far too long"]
    subjects = ["the movie", "the plot", "the film", "the ending", "the actors", "the dialogue"]
    out = os.path.join(ROOT, "data")
    os.makedirs(out, exist_ok=True)
    for split, n in [("train", 64), ("dev", 24)]:
        with open(os.path.join(out, f"sentiment-{split}.jsonl"), "w") as f:
            for _ in range(n):
                positive = rng.random() < 0.5
                text = f"{rng.choice(subjects)} was {rng.choice(good if positive else bad)}"
                f.write(json.dumps({"text": text, "label": "positive" if positive else "negative"}) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--gguf"]:
        make_gguf_fixture()
    elif sys.argv[1:2] == ["--prefix-references"]:
        for fixture in sys.argv[2:] or ["tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-gemma3", "tiny-mistral"]:
            make_prefix_reference(fixture)
    else:
        main()
        for fixture in sys.argv[1:] or ["tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-gemma3", "tiny-mistral"]:
            make_prefix_reference(fixture)
        make_gguf_fixture()
        make_toy_sentiment()
