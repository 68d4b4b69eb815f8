"""Per-head RMSNorm of q and k, optionally followed by interleaved RoPE (FLUX)."""
import torch


def qk_norm_rope_reference(q, k, q_weight, k_weight, cos=None, sin=None, eps: float = 1e-6):
    """q, k: (B, L, H, Dh) (any strides); weights: (Dh,); cos, sin: (L, Dh/2) or None.

    Returns q, k as (B, H, L, Dh), RMS statistics in fp32, rotation of adjacent pairs
    ``(x[2j], x[2j+1])`` by the angle whose cos/sin are given.
    """
    def one(t, w):
        tf = t.float()
        tf = tf * torch.rsqrt(tf.pow(2).mean(-1, keepdim=True) + eps) * w.float()
        if cos is not None:
            t0, t1 = tf[..., 0::2], tf[..., 1::2]  # (B, L, H, Dh/2)
            c, s = cos[None, :, None].float(), sin[None, :, None].float()
            tf = torch.stack([t0 * c - t1 * s, t0 * s + t1 * c], dim=-1).flatten(-2)
        return tf.to(t.dtype).transpose(1, 2)

    return one(q, q_weight), one(k, k_weight)


def qk_norm_rope(q, k, q_weight, k_weight, cos=None, sin=None, eps: float = 1e-6):
    return qk_norm_rope_reference(q, k, q_weight, k_weight, cos, sin, eps)
