"""adaLN modulation: LayerNorm without affine, then ``* (1 + scale) + shift``."""
import torch
import torch.nn.functional as F


def modulate_reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6):
    """x: (B, N, D); shift, scale: (B, D) -> (B, N, D). LayerNorm statistics in fp32."""
    h = F.layer_norm(x.float(), x.shape[-1:], eps=eps)
    return (h * (1 + scale.float()[:, None]) + shift.float()[:, None]).to(x.dtype)


def modulate(x, shift, scale, eps: float = 1e-6):
    return modulate_reference(x, shift, scale, eps)
