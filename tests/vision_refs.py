"""Tiny random multimodal reference models (transformers 5.23) and their inputs, for the vision tests.

Each layout is a tiny multimodal variant (gemma4.variants.MULTIMODAL) and switches on what its
released model has: E2B-like (PLE, KV sharing, clipped linears, GQA in the tower, causal image
tokens), 31B-like (standardize, bidirectional sliding layers), the 12B's patch embedder (blocks on
every layer), Gemma 3's SigLIP (bidirectional on all layers).
"""

from __future__ import annotations

import torch

from gemma4.variants import multimodal_hf_config

IMAGE, VIDEO, BOI, EOI = 127, 126, 125, 124  # the tiny variants' placeholder ids (gemma4.variants.MULTIMODAL)
LAYOUTS = {"e2b": "tiny-e2b", "31b": "tiny-31b", "12b": "tiny-12b", "gemma3": "tiny-gemma-3-4b"}


def hf_multimodal(layout: str, seed: int = 0, edit=None):
    """A transformers multimodal model with random weights (norms, clip ranges and standardize too);
    `edit(raw)` may change the config.json dict first (e.g. another vocabulary and placeholder ids)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma4Config, Gemma4ForConditionalGeneration
    from transformers.models.gemma4_unified import Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration

    raw = multimodal_hf_config(LAYOUTS[layout])
    if edit is not None:
        edit(raw)
    kind = raw.pop("model_type")
    cls, cfg_cls = {"gemma3": (Gemma3ForConditionalGeneration, Gemma3Config),
                    "gemma4": (Gemma4ForConditionalGeneration, Gemma4Config),
                    "gemma4_unified": (Gemma4UnifiedForConditionalGeneration, Gemma4UnifiedConfig)}[kind]
    def build(raw):
        cfg = cfg_cls(**raw)
        cfg._attn_implementation = "eager"
        cfg.get_text_config()._attn_implementation = "eager"
        torch.manual_seed(seed)
        return cls(cfg).eval()

    state = None
    if raw.get("audio_config") is not None:
        # transformers' init draws the audio weights between the others: replay the random state that a
        # model without audio leaves, and draw the audio side last, so the text and image weights stay
        # the draws the vision tests were measured on.
        build(raw | {"audio_config": None})
        state = torch.get_rng_state()
    model = build(raw)
    if state is not None:
        torch.set_rng_state(state)
    for audio in (False, True):
        _randomize(model, layout, lambda name: ("audio" in name) == audio)
    return model


def _randomize(model, layout: str, which) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not which(name):
                continue
            if p.dim() == 1:
                zero_centred = layout == "gemma3" and name.endswith("norm.weight") and "language_model" in name
                p.uniform_(-0.5, 0.5) if zero_centred or name.endswith("bias") else p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.5 / p.shape[-1] ** 0.5 if "embed_tokens" not in name else 0.3)
        for name, b in model.named_buffers():
            if not which(name):
                continue
            if name.endswith("layer_scalar"):
                b.uniform_(0.5, 1.5)
            elif name.endswith(("input_max", "output_max")):
                b.fill_(torch.empty(()).uniform_(0.3, 1.0).item())
            elif name.endswith(("input_min", "output_min")):
                b.fill_(-torch.empty(()).uniform_(0.3, 1.0).item())
            elif name.endswith("std_bias"):
                b.uniform_(-0.5, 0.5)
            elif name.endswith("std_scale"):
                b.uniform_(0.5, 1.5)


def images(layout: str, seed: int = 1) -> dict:
    """Two images as the layout's processor would give them, and their soft-token counts.

    Gemma 4: a 96x144 image (6x9 patches -> 2x3 soft tokens) and a 48x48 one (1 token), both padded
    to 63 patches; the 12B: merged 48x48 patches of the same two images; Gemma 3: two 56x56 images."""
    g = torch.Generator().manual_seed(seed)
    if layout == "gemma3":
        return {"pixel_values": torch.randn(2, 3, 56, 56, generator=g), "counts": [4, 4]}
    side = 16 if layout != "12b" else 48
    grids, total = ([(6, 9), (3, 3)], 63) if layout != "12b" else ([(2, 3), (1, 1)], 7)
    pixels = torch.zeros(2, total, 3 * side * side)
    pos = torch.full((2, total, 2), -1, dtype=torch.long)
    for i, (rows, cols) in enumerate(grids):
        n = rows * cols
        pixels[i, :n] = torch.rand(n, 3 * side * side, generator=g)
        pos[i, :n, 0] = torch.arange(n) % cols
        pos[i, :n, 1] = torch.arange(n) // cols
    counts = [r * c // (9 if layout != "12b" else 1) for r, c in grids]
    return {"pixel_values": pixels, "image_position_ids": pos, "counts": counts}


def prompt(counts: list[int], seed: int = 2, tail: int = 5) -> torch.Tensor:
    """[1, T]: text, then per image BOI + placeholders + EOI with text between; text ids in 1..119."""
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randint(1, 120, (3,), generator=g)]
    for n in counts:
        parts += [torch.tensor([BOI] + [IMAGE] * n + [EOI]), torch.randint(1, 120, (tail,), generator=g)]
    return torch.cat(parts)[None]


def reference_logits(model, layout: str, ids: torch.Tensor, media: dict) -> torch.Tensor:
    """The reference's logits for ids with the images of `media` (its first len(counts) images)."""
    kwargs = {"pixel_values": media["pixel_values"]}
    if layout == "gemma3":
        kwargs["token_type_ids"] = (ids == IMAGE).long()
    else:
        kwargs["image_position_ids"] = media["image_position_ids"]
        kwargs["mm_token_type_ids"] = (ids == IMAGE).long()
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def video(layout: str, frames: int = 2, seed: int = 3) -> dict:
    """A video as the Gemma 4 / 12B video processor gives it: `frames` frames of 48x96 (3x6 patches ->
    1x2 soft tokens), padded to 27 patches (the 12B: 2 merged patches padded to 3)."""
    g = torch.Generator().manual_seed(seed)
    side, (rows, cols), total = (48, (1, 2), 3) if layout == "12b" else (16, (3, 6), 27)
    n = rows * cols
    pixels = torch.zeros(frames, total, 3 * side * side)
    pixels[:, :n] = torch.rand(frames, n, 3 * side * side, generator=g)
    pos = torch.full((frames, total, 2), -1, dtype=torch.long)
    pos[:, :n, 0], pos[:, :n, 1] = torch.arange(n) % cols, torch.arange(n) // cols
    return {"pixel_values_videos": pixels, "video_position_ids": pos, "counts": [2] * frames}


def video_prompt(counts: list[int], seed: int = 4) -> torch.Tensor:
    """[1, T]: per frame a 2-token timestamp, BOI, video placeholders, EOI (the chat template's shape)."""
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randint(1, 120, (2,), generator=g)]
    for n in counts:
        parts += [torch.randint(1, 120, (2,), generator=g), torch.tensor([BOI] + [VIDEO] * n + [EOI])]
    return torch.cat(parts + [torch.randint(1, 120, (3,), generator=g)])[None]


def saved_layouts(tmp_path_factory, layouts) -> dict:
    """layout -> (its checkpoint dir, its tensors): a reference model of each saved once."""
    from safetensors.torch import load_file

    out = {}
    for layout in layouts:
        path = tmp_path_factory.mktemp(layout)
        hf_multimodal(layout).save_pretrained(path)
        out[layout] = (path, load_file(path / "model.safetensors"))
    return out


def write_edited(saved: dict, layout: str, directory, edit):
    """A copy of a saved layout in `directory` with its tensors edited: `edit` changes the dict in
    place or returns a new one."""
    from safetensors.torch import save_file

    path, state = saved[layout]
    state = dict(state)
    state = edit(state) or state
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text((path / "config.json").read_text())
    save_file(state, directory / "model.safetensors")
    return directory


def loaded_layouts(tmp_path_factory, layouts) -> dict:
    """layout -> (reference model, our model loaded in float32 from its save_pretrained output)."""
    from gemma4.weights import load_model

    out = {}
    for layout in layouts:
        ref = hf_multimodal(layout)
        path = tmp_path_factory.mktemp(layout)
        ref.save_pretrained(path)
        out[layout] = (ref, load_model(path, dtype=torch.float32))
    return out
