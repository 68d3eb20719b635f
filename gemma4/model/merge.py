"""Soft tokens into the text stream (spec 6.3) and the image blocks of the prefill mask (spec 1.11).

The merge, as the reference does it: placeholder ids become the pad id (0) both for the token
embedding and for the PLE token part; the soft tokens replace the placeholders' embeddings in
order and are not multiplied by sqrt(D); the PLE context part then reads the merged embeddings
(`TextModel.per_layer_inputs` does that when handed `inputs_embeds`).

Image blocks: `groups` [B, T] gives each token of a forward a block id (-1: text; one id per
image or video frame). Tokens of one block see each other both ways on the layer types of
`TextConfig.vision_block_types`; the masks compare key *positions* with the block's position
range, so a block needs no particular layout in the cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Key of the block bounds in a forward's shared `masks` dict (see Attention.forward).
BLOCKS = "vision_blocks"


def placeholder_mask(input_ids: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
    """True where input_ids holds one of the placeholder ids."""
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for i in ids:
        mask |= input_ids == i
    return mask


def merge(embed, input_ids: torch.Tensor, soft: Sequence[torch.Tensor], placeholders: Sequence[int],
          pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids with placeholders -> pad_id, input embeddings with the soft tokens in place).

    embed: ids -> scaled token embeddings (`TextModel.embed`); soft: each input's soft tokens
    (an image, video frame or audio clip) [n_i, D] in prompt order (rows of all batch rows, row-major). Their total must equal the
    number of placeholders.
    """
    mask = placeholder_mask(input_ids, placeholders)
    n = sum(int(s.shape[0]) for s in soft)
    count = int(mask.sum())
    if count != n:
        raise ValueError(f"the prompt holds {count} image/video/audio placeholder tokens but {len(soft)} media "
                         f"inputs gave {n} soft tokens: expand each input's placeholders with the processor of "
                         "this model")
    ids = input_ids.masked_fill(mask, pad_id)
    embeds = embed(ids)
    if n:
        embeds = embeds.masked_scatter(mask[..., None], torch.cat(list(soft)).to(embeds))
    return ids, embeds


def vision_groups(input_ids: torch.Tensor, placeholders: Sequence[int]) -> torch.Tensor | None:
    """Block ids [B, T] as the reference derives them: each maximal run of placeholder tokens is one
    block (numbered from 0 per row), -1 elsewhere; None when there is no placeholder."""
    is_vision = placeholder_mask(input_ids, placeholders)
    if not bool(is_vision.any()):
        return None
    prev = torch.nn.functional.pad(is_vision, (1, 0))[:, :-1]
    starts = is_vision & ~prev
    return torch.where(is_vision, starts.long().cumsum(-1) - 1, -1)


def block_bounds(groups: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[2, B, T]: per query, the first and last position of its block ([big, -1], empty, for text).

    Group ids may be any integers >= 0; a block is the tokens of one row with one id."""
    B, T = groups.shape
    inside = groups >= 0
    rows = torch.arange(B, device=groups.device)[:, None].expand(B, T)
    _, index = torch.unique(torch.stack([rows, groups], -1).reshape(-1, 2), dim=0, return_inverse=True)
    index = index.view(B, T)
    bins = int(index.max()) + 1
    big = torch.iinfo(torch.long).max
    pos, idx = positions[inside], index[inside]
    lo = torch.full((bins,), big, dtype=torch.long, device=groups.device).scatter_reduce(0, idx, pos, "amin")
    hi = torch.full((bins,), -1, dtype=torch.long, device=groups.device).scatter_reduce(0, idx, pos, "amax")
    return torch.stack([torch.where(inside, lo[index], big), torch.where(inside, hi[index], -1)])
