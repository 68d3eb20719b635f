"""attend(): every path equals plain softmax attention over the unmasked keys."""

import pytest
import torch

from gemma4.model.attention import attend, attention_mask


def _plain(q, k, v, mask, scale):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    return ((q @ k.transpose(-1, -2)) * scale + mask).softmax(-1) @ v


@pytest.mark.parametrize("heads,kv_heads", [(4, 1), (4, 2), (2, 2)])
@pytest.mark.parametrize("T", [1, 5])
def test_attend_matches_plain_attention(heads, kv_heads, T):
    """T = 1 on CPU is the decode branch (matmuls, not SDPA); windowed, with empty slots (-1)."""
    gen = torch.Generator().manual_seed(0)
    B, S, d = 2, 12, 16
    q = torch.randn(B, heads, T, d, generator=gen)
    k, v = torch.randn(2, B, kv_heads, S, d, generator=gen)
    k_pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, -1, -1], [-1, -1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])
    q_pos = torch.arange(10 - T, 10).expand(B, T)
    mask = attention_mask(q_pos, k_pos, 4, q.dtype)
    got = attend(q, k, v, mask, 0.25)
    torch.testing.assert_close(got, _plain(q, k, v, mask, 0.25), rtol=1e-5, atol=1e-5)
