"""The Gemma 3 / Gemma 4 text decoder: one model for the family, checkpoint-native names.

Module names equal the Hugging Face checkpoint's (`model.layers.3.self_attn.q_proj.weight`), so
loading is a name-for-name assignment. What differs between variants lives in `TextConfig` and
its per-layer `LayerSpec`s: per-layer embeddings, KV sharing, k_eq_v, double-wide MLPs, MoE.

Data flow of `Gemma.forward` (spec 1.9):
    ids -> embed * sqrt(D) -> [PLE inputs] -> layers (attention, MLP[+MoE], [PLE], * layer_scalar)
        -> final norm -> tied head -> soft-cap
The forward never samples and knows nothing of tokenizers or serving; caches are handed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from ..config import AudioConfig, LayerSpec, TextConfig, VisionConfig, check_context
from .attention import KV, Attention, LayerCache
from .audio import AudioTower
from .layers import MLP, Experts, RMSNorm, Router, gelu, rope_cos_sin, rope_inv_freq
from .merge import BLOCKS, block_bounds, merge, vision_groups
from .siglip import Projector, SiglipTower
from .vision import MultimodalEmbedder, UnifiedEmbedder, VisionTower


class ModelCache(Protocol):
    """A whole-model KV cache for one forward (see gemma4.engine.cache)."""

    def prepare(self, shape: tuple[int, int], positions: torch.Tensor | None,
                attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Open a forward of `shape` [B, T] tokens: return their positions, `positions` if given,
        else those after what each row holds (left padding per `attention_mask` at -1)."""
        ...

    def layer(self, index: int) -> LayerCache | None:
        ...


def _capturing() -> bool:
    """Inside torch.compile's trace or a CUDA-graph capture, where reading a value back is not allowed."""
    return torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def soft_cap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(logits / cap): logits squashed into (-cap, cap); unchanged when cap is None."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


@dataclass
class DecoderOutput:
    """Final-normed hidden states [B, T', D] and the K/V of the KV-producing layers.

    `shared_kv` maps layer type -> (K, V, key positions) of the last K/V-computing layer of that
    type: the store layers of a KV-sharing model, which is what the MTP drafter attends to.
    """

    hidden: torch.Tensor
    shared_kv: dict[str, KV]


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, spec: LayerSpec):
        super().__init__()
        dim, eps, off = config.hidden_size, config.rms_norm_eps, config.norm_offset
        self.spec = spec
        self.self_attn = Attention(config, spec)
        self.mlp = MLP(dim, spec.intermediate_size)
        self.input_layernorm = RMSNorm(dim, eps, off)
        self.post_attention_layernorm = RMSNorm(dim, eps, off)
        self.pre_feedforward_layernorm = RMSNorm(dim, eps, off)
        self.post_feedforward_layernorm = RMSNorm(dim, eps, off)
        self.moe = config.enable_moe_block
        if self.moe:
            self.router = Router(dim, config.num_experts, config.top_k_experts, eps)
            self.experts = Experts(config.num_experts, dim, config.moe_intermediate_size)
            self.pre_feedforward_layernorm_2 = RMSNorm(dim, eps)
            self.post_feedforward_layernorm_1 = RMSNorm(dim, eps)
            self.post_feedforward_layernorm_2 = RMSNorm(dim, eps)
        self.ple = config.hidden_size_per_layer_input
        if self.ple:
            self.per_layer_input_gate = nn.Linear(dim, self.ple, bias=False)
            self.per_layer_projection = nn.Linear(self.ple, dim, bias=False)
            self.post_per_layer_input_norm = RMSNorm(dim, eps)
        if config.family == "gemma4":
            # A learned scalar multiplying the whole residual stream; a buffer, as in the checkpoint.
            self.register_buffer("layer_scalar", torch.ones(1))
        else:
            self.layer_scalar = None

    def forward(self, h, cos, sin, q_pos, masks, ple_input=None, kv=None, cache=None) -> tuple[torch.Tensor, KV]:
        attn, kv = self.self_attn(self.input_layernorm(h), cos, sin, q_pos, masks, kv=kv, cache=cache)
        h = h + self.post_attention_layernorm(attn)
        f = self.mlp(self.pre_feedforward_layernorm(h))
        if self.moe:
            flat = h.reshape(-1, h.shape[-1])
            weights, index = self.router(flat)  # the router reads the raw residual, not a normed input
            e = self.experts(self.pre_feedforward_layernorm_2(flat), weights, index).view_as(h)
            f = self.post_feedforward_layernorm_1(f) + self.post_feedforward_layernorm_2(e)
        h = h + self.post_feedforward_layernorm(f)
        if self.ple:
            g = self.per_layer_projection(gelu(self.per_layer_input_gate(h)) * ple_input)
            h = h + self.post_per_layer_input_norm(g)
        if self.layer_scalar is not None:
            h = h * self.layer_scalar
        return h, kv


def _embedding(rows: int, dim: int) -> nn.Embedding:
    """nn.Embedding, built without its normal_ init on the meta device (a checkpoint load fills it):
    there, that init runs a Python meta kernel whose first call cost 0.8 s of each load."""
    if torch.get_default_device().type == "meta":
        return nn.Embedding(rows, dim, _weight=torch.empty(rows, dim))
    return nn.Embedding(rows, dim)


class TextModel(nn.Module):
    """The decoder stack (`model.*` in checkpoints)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = _embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, spec) for spec in config.layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_offset)
        p = config.hidden_size_per_layer_input
        if p:
            self.embed_tokens_per_layer = _embedding(config.vocab_size_per_layer_input, config.num_hidden_layers * p)
            self.per_layer_model_projection = nn.Linear(config.hidden_size, config.num_hidden_layers * p, bias=False)
            self.per_layer_projection_norm = RMSNorm(p, config.rms_norm_eps)
        for t in set(config.layer_types):
            inv_freq = rope_inv_freq(config.rope(t), torch.get_default_device())
            self.register_buffer(f"inv_freq_{t}", inv_freq, persistent=False)

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute non-persistent buffers (RoPE tables), e.g. after building on the meta device."""
        for t in set(self.config.layer_types):
            setattr(self, f"inv_freq_{t}", rope_inv_freq(self.config.rope(t), device))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings times sqrt(D), the factor rounded to the weight dtype as the reference does."""
        w = self.embed_tokens.weight
        return self.embed_tokens(ids) * torch.tensor(self.config.hidden_size**0.5).to(w.dtype)

    def per_layer_tokens(self, ids: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """The token part of the PLE inputs, rows of the table times sqrt(P): [B, T, L*P] on `device`.

        The lookup runs where the table lives: E2B's table (2.35B parameters) may stay in CPU
        memory while the model runs on a GPU; then only the looked-up rows cross to the device.
        """
        table = self.embed_tokens_per_layer
        w = table.weight
        rows = table(ids.to(w.device)) * torch.tensor(self.config.hidden_size_per_layer_input**0.5).to(w.dtype)
        return rows.to(device if device is not None else ids.device, non_blocking=True)

    def per_layer_inputs(self, ids: torch.Tensor, embeds: torch.Tensor, tok: torch.Tensor | None = None) -> torch.Tensor:
        """PLE inputs [B, T, L, P] from the token ids and the final input embeddings (spec 1.8).

        `tok`: the token part, already looked up (`per_layer_tokens`), e.g. outside a CUDA graph.
        """
        c = self.config
        L, P = c.num_hidden_layers, c.hidden_size_per_layer_input
        if tok is None:
            tok = self.per_layer_tokens(ids, embeds.device)
        ctx = self.per_layer_model_projection(embeds) * c.hidden_size**-0.5
        ctx = self.per_layer_projection_norm(ctx.view(*ids.shape, L, P))
        return (ctx + tok.view(*ids.shape, L, P).to(ctx.dtype)) * 2.0**-0.5

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None,
        cache: ModelCache | None = None,
        keep: torch.Tensor | None = None,
        ple_tokens: torch.Tensor | None = None,
        groups: torch.Tensor | None = None,
    ) -> DecoderOutput:
        """Run the stack. `keep` (indices along T) lets the KV-shared tail skip unneeded rows.

        input_ids carry the token identity for PLE even when `inputs_embeds` (e.g. with merged
        image/audio soft tokens) are given; placeholder ids should then be the pad id 0.
        `ple_tokens`: the PLE table rows of input_ids if already looked up (`per_layer_tokens`).
        `groups`: image-block ids of the tokens (see `Gemma.decode`).
        """
        c = self.config
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        ple = self.per_layer_inputs(input_ids, h, ple_tokens) if c.hidden_size_per_layer_input else None
        rope = {t: rope_cos_sin(getattr(self, f"inv_freq_{t}"), positions, h.dtype) for t in set(c.layer_types)}
        masks: dict[str, torch.Tensor] = {}
        if groups is not None and c.vision_block_types and bool((groups >= 0).any()):
            masks[BLOCKS] = block_bounds(groups.to(positions.device), positions)
        # Latest K/V per layer type; by the first KV-shared layer these are the producers' (spec 1.5).
        shared_kv: dict[str, KV] = {}
        q_pos = positions
        for spec, layer in zip(c.layers, self.layers):
            if keep is not None and spec.index == c.first_shared_layer and c.num_kv_shared_layers:
                # From here on no layer writes K/V, so only the rows whose output is wanted matter.
                h, q_pos = h[:, keep], q_pos[:, keep]
                ple = ple[:, keep] if ple is not None else None
                rope = {t: (cos[:, keep], sin[:, keep]) for t, (cos, sin) in rope.items()}
                masks = {BLOCKS: masks[BLOCKS][:, :, keep]} if BLOCKS in masks else {}
                keep = None
            cos, sin = rope[spec.type]
            h, kv = layer(
                h,
                cos,
                sin,
                q_pos,
                masks,
                ple_input=ple[:, :, spec.index] if ple is not None else None,
                kv=shared_kv[spec.type] if spec.shares_kv else None,
                cache=cache.layer(spec.index) if cache is not None and not spec.shares_kv else None,
            )
            shared_kv[spec.type] = kv
        if keep is not None:
            h = h[:, keep]
        return DecoderOutput(self.norm(h), shared_kv)


class Gemma(nn.Module):
    """Gemma causal LM: `model` (the decoder) plus the tied LM head and final soft-cap; with a
    `vision` config also the image side under the checkpoint's names (gemma4.model.vision):
    `vision_tower` + `embed_vision` (Gemma 4), `vision_embedder` + `embed_vision` (12B),
    `vision_tower` + `multi_modal_projector` (Gemma 3); with an `audio` config the audio side
    (gemma4.model.audio): `audio_tower` + `embed_audio` (E2B/E4B), `embed_audio` alone (12B).

    Media, as the engine drives them: `embed_media` (an image or video frame) and `embed_audio`
    (a clip) turn processor outputs into soft tokens; `media_inputs` (or the engine itself) places
    them over the prompt's placeholders; `decode(..., inputs_embeds=, groups=)` runs the prefill.
    """

    def __init__(self, config: TextConfig, vision: VisionConfig | None = None, audio: AudioConfig | None = None):
        super().__init__()
        self.config = config
        self.vision_config = vision
        self.audio_config = audio
        self.model = TextModel(config)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, False)
        if vision is not None:
            if vision.text_hidden_size != config.hidden_size:
                raise ValueError(f"vision config projects to width {vision.text_hidden_size}, the text model is "
                                 f"{config.hidden_size} wide")
            if vision.kind == "siglip":
                self.vision_tower = SiglipTower(vision)
                self.multi_modal_projector = Projector(vision)
            else:
                if vision.kind == "gemma4":
                    self.vision_tower = VisionTower(vision)
                else:
                    self.vision_embedder = UnifiedEmbedder(vision)
                self.embed_vision = MultimodalEmbedder(vision.hidden_size, config.hidden_size, vision.rms_norm_eps)
        if audio is not None:
            if audio.text_hidden_size != config.hidden_size:
                raise ValueError(f"audio config projects to width {audio.text_hidden_size}, the text model is "
                                 f"{config.hidden_size} wide")
            if audio.kind == "conformer":
                self.audio_tower = AudioTower(audio)
            self.embed_audio = MultimodalEmbedder(audio.output_proj_dims, config.hidden_size, audio.rms_norm_eps)

    # -- images ---------------------------------------------------------------------------------------
    def embed_media(self, pixel_values: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Soft tokens [n, D_text] of one image or video frame (or of N, concatenated in order).

        Takes the reference processor's outputs: Gemma 4 and 12B `pixel_values` [N, max_patches,
        3*p*p] in [0, 1] (the 12B: p = 48) with `position_ids` [N, max_patches, 2] (the processor's
        image_position_ids / video_position_ids: (column, row), -1 at padding), N may be left out;
        Gemma 3 `pixel_values` [N, 3, S, S] and no position ids. n = the image's placeholder
        count: valid patches / 9 (Gemma 4), valid patches (12B), mm_tokens_per_image (Gemma 3).
        """
        v = self.vision_config
        if v is None:
            raise ValueError("this model has no vision tower (a text-only checkpoint, or loaded with text_only=True); "
                             "send text only, or load a multimodal checkpoint without text_only")
        if v.kind == "siglip":
            x = pixel_values[None] if pixel_values.dim() == 3 else pixel_values
            if x.dim() != 4 or tuple(x.shape[1:]) != (3, v.image_size, v.image_size):
                raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}: this Gemma 3 model takes "
                                 f"[N, 3, {v.image_size}, {v.image_size}] from its processor")
            return self.multi_modal_projector(self.vision_tower(x)).flatten(0, 1)
        x, pos = (pixel_values[None], position_ids) if pixel_values.dim() == 2 else (pixel_values, position_ids)
        side = v.patch_size * (v.pooling_kernel_size if v.kind == "unified" else 1)
        if pos is not None and pos.dim() == 2:
            pos = pos[None]
        if x.dim() != 3 or x.shape[-1] != 3 * side * side or pos is None or tuple(pos.shape) != (*x.shape[:2], 2):
            raise ValueError(f"pixel_values {tuple(pixel_values.shape)} and position_ids "
                             f"{None if position_ids is None else tuple(position_ids.shape)}: this model takes "
                             f"[N, patches, {3 * side * side}] and [N, patches, 2] from its processor")
        pos = pos.to(x.device, torch.long)
        soft = self.vision_tower(x, pos) if v.kind == "gemma4" else self.vision_embedder(x, pos)
        return self.embed_vision(soft)

    # -- audio ----------------------------------------------------------------------------------------
    def embed_audio(self, input_features: torch.Tensor, input_features_mask: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """Soft tokens [n, D_text] of ONE clip (or of N clips, concatenated in order).

        Takes the reference processor's outputs: E2B/E4B `input_features` [N, T, 128] float log-mel
        frames and `input_features_mask` [N, T] bool (True = real audio); the 12B `input_features`
        [N, T, 640] float raw 40 ms frames and `input_features_mask` [N, T] bool. N may be left out;
        a missing mask means every frame is real. n = the clip's placeholder count exactly as the
        reference processor counts it (`replace_audio_token`): the mask's True entries after
        `[::2]` twice (E2B/E4B), the mask's True entries (12B).
        """
        a = self.audio_config
        if a is None:
            raise ValueError("this model takes no audio: E2B, E4B and the 12B do (or it was loaded with "
                             "text_only=True); send text or images only, or load one of those without text_only")
        x = input_features[None] if input_features.dim() == 2 else input_features
        width = a.mel_bins if a.kind == "conformer" else a.output_proj_dims
        what = f"{width} log-mel bins" if a.kind == "conformer" else f"{width} raw samples"
        if x.dim() != 3 or x.shape[-1] != width or x.shape[1] == 0 or not x.is_floating_point():
            raise ValueError(f"input_features of shape {tuple(input_features.shape)} ({input_features.dtype}): this "
                             f"model takes float [N, frames, {width}] ({what} per frame) from its processor")
        if input_features_mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        else:
            mask = input_features_mask[None] if input_features_mask.dim() == 1 else input_features_mask
            if tuple(mask.shape) != tuple(x.shape[:2]) or mask.is_floating_point() or mask.is_complex():
                raise ValueError(f"input_features_mask of shape {tuple(input_features_mask.shape)} "
                                 f"({input_features_mask.dtype}) for input_features {tuple(input_features.shape)}: "
                                 f"it must be bool [N, frames] = {list(x.shape[:2])}, True at real audio")
            mask = mask.to(x.device) != 0
        if a.kind == "unified":
            return self.audio_embedder(x)[mask]
        hidden, valid = self.audio_tower(x, mask)
        return self.audio_embedder(hidden)[valid]

    @property
    def audio_embedder(self) -> MultimodalEmbedder:
        """The checkpoint's `embed_audio` module (norm + projection); the name `embed_audio` itself is
        the method above (the contract), so the module is reached through `_modules`."""
        return self._modules["embed_audio"]

    def get_submodule(self, target: str) -> nn.Module:
        """As nn.Module's, except that `embed_audio` resolves to the module, not the method."""
        head, _, rest = target.partition(".")
        if head == "embed_audio" and head in self._modules:
            return self._modules[head].get_submodule(rest) if rest else self._modules[head]
        return super().get_submodule(target)

    def media_inputs(self, input_ids: torch.Tensor, soft_tokens: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Keyword arguments of `decode` for a prompt with images, video or audio: input_ids
        (placeholders -> the pad id), inputs_embeds (soft tokens over the placeholders, in order) and
        groups (each run of image/video placeholders one block; audio stays causal). soft_tokens:
        `embed_media` / `embed_audio` outputs in prompt order (batch rows in order). Raises
        ValueError when the counts differ."""
        v, a = self.vision_config, self.audio_config
        placeholders = v.placeholder_ids if v is not None else ()
        audio = (a.audio_token_id,) if a is not None else ()
        ids, embeds = merge(self.model.embed, input_ids, soft_tokens, placeholders + audio, self.config.pad_token_id)
        out = {"input_ids": ids, "inputs_embeds": embeds}
        groups = vision_groups(input_ids, placeholders) if placeholders else None
        if groups is not None:
            out["groups"] = groups
        return out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # A tied model may be given an lm_head, a repacked copy of the table (gemma4.engine.cpu).
        if self.lm_head is None:
            logits = torch.nn.functional.linear(hidden, self.model.embed_tokens.weight)
        else:
            logits = self.lm_head(hidden)
        return soft_cap(logits, self.config.final_logit_softcapping)

    def decode(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: ModelCache | None = None,
        logits_to_keep: int | torch.Tensor | None = None,
        ple_tokens: torch.Tensor | None = None,
        groups: torch.Tensor | None = None,
    ) -> DecoderOutput:
        """Hidden states (final-normed) for the kept positions, plus the producers' K/V.

        positions: [B, T] token positions, -1 at padding. Defaults to consecutive positions after
        what the cache holds, or to `attention_mask.cumsum(-1) - 1` (left padding takes no
        position). logits_to_keep: an int n keeps the last n positions; a tensor keeps those
        indices; None keeps all. ple_tokens: the PLE table rows of input_ids, if already looked up.

        inputs_embeds [B, T, D]: input embeddings with soft tokens merged (`media_inputs`); input_ids
        must then hold the pad id at the placeholders (PLE reads them). groups [B, T] long, for a
        prefill with images: -1 for text, one id >= 0 per image or video frame; tokens of one
        block attend to each other both ways within this forward on the layer types where the
        reference does (Gemma 3 all; Gemma 4 12B/26B/31B sliding only; E2B/E4B none: ignored),
        everything else stays causal / sliding. A block must not be split across forwards.
        Decode steps pass no groups. None costs nothing.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if cache is not None:
            positions = cache.prepare((B, T), positions, attention_mask)
        elif positions is None:
            if attention_mask is not None:
                positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, -1)
            else:
                positions = torch.arange(T, device=input_ids.device).expand(B, T)
        if not _capturing():  # a traced or captured step's positions were checked by its caller
            check_context(self.config.max_position_embeddings, int(positions.max()) + 1)
        keep = None
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            keep = torch.arange(max(T - logits_to_keep, 0), T, device=input_ids.device)
        elif isinstance(logits_to_keep, torch.Tensor):
            keep = logits_to_keep.to(input_ids.device)
        return self.model(input_ids, positions, inputs_embeds=inputs_embeds, cache=cache, keep=keep,
                          ple_tokens=ple_tokens, groups=groups)

    def forward(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Logits [B, T', V] (soft-capped); keyword arguments as in `decode`."""
        return self.logits(self.decode(input_ids, **kwargs).hidden)


