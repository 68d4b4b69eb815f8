"""Gated residual ``x + gate * y`` with the masked massive-activation fork."""
import torch


def gated_residual_reference(x, y, gate, fork=None, channels=None, rho=0.0, token_start=0, token_mask=None):
    """x, y: (B, N, D); gate: (B, D) -> (B + n_fork, N, D).

    Rows where ``fork`` (B,) is True are appended after the B rows, in order, with
    ``channels`` (K,) of tokens ``>= token_start`` (and, if given, where ``token_mask``
    (N - token_start,) is True) multiplied by ``rho`` (a float or an (n_fork,) tensor).
    """
    out = x + gate[:, None] * y
    if fork is None:
        return out
    forked = out[fork]  # (n, N, D)
    n, N, D = forked.shape
    tokens = torch.arange(token_start, N, device=x.device)
    if token_mask is not None:
        tokens = tokens[token_mask.to(x.device)]
    factor = torch.ones(n, N, D, dtype=torch.float32, device=x.device)
    rho = torch.as_tensor(rho, dtype=torch.float32, device=x.device).reshape(-1, 1, 1)
    factor[:, tokens[:, None], channels.to(x.device)[None, :]] = rho.expand(n, len(tokens), len(channels))
    return torch.cat([out, (forked.float() * factor).to(out.dtype)])


def gated_residual(x, y, gate, fork=None, channels=None, rho=0.0, token_start=0, token_mask=None):
    return gated_residual_reference(x, y, gate, fork, channels, rho, token_start, token_mask)
