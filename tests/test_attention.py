"""Joint attention with a text padding mask, alone and with PAG's identity rows: each row equals
SDPA on that row alone with the keys it may see."""
import torch
import torch.nn.functional as F

from mmdit.models.attention import attention, identity_mask

TOL = 1e-6  # fp32, one SDPA per row against a batched one


def test_masked_attention_with_identity_rows_equals_each_row_alone():
    g = torch.Generator().manual_seed(0)
    B, H, L, N, Dh = 3, 2, 3, 5, 8
    q, k, v = (torch.randn(B, H, L + N, Dh, generator=g) for _ in range(3))
    text = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)  # padded prompts
    mask = torch.cat([text, torch.ones(B, N, dtype=torch.bool)], 1)[:, None, None]  # (B, 1, 1, L + N)
    out = attention(q, k, v, identity=((1, 2),), q_text=L, k_text=L, mask=mask)
    pag = identity_mask(L + N, L + N, L, L, q.device)
    for b in range(B):
        allowed = mask[b, 0] & pag if b == 1 else mask[b, 0].expand(L + N, -1)
        ref = F.scaled_dot_product_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], attn_mask=allowed)
        assert (out[b] - ref[0].transpose(0, 1).flatten(1)).abs().max().item() <= TOL
    plain = attention(q, k, v, mask=mask)
    assert (plain[0] - out[0]).abs().max().item() <= TOL and (plain[1] - out[1]).abs().max().item() > 1e-3
