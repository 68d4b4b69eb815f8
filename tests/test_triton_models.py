"""Model-level parity with diffusers when every block runs the Triton kernels (interpreter on CPU)."""
import sys
from collections import Counter

import pytest

import mmdit
from peers import flux_peer, parity, save_diffusers_folder, sd3_peer

PARITY = 1e-4  # max abs err / max abs output, fp32 (docs/architecture.md, tolerances)
# Small enough for the Triton interpreter: 1-2 blocks, 2 heads, a 4x4 latent, 3 text tokens.
PEERS = {
    "sd3.5-medium-like": lambda: sd3_peer(num_layers=2, heads=2, head_dim=16, qk_norm=True, dual=(0,), pos_max=4),
    "flux-dev-like": lambda: flux_peer(num_double=1, num_single=1, heads=2, head_dim=16, axes=(4, 6, 6)),
}


OPS = ("norm_modulate", "gated_residual", "qk_norm_rope")


def count_triton_calls(monkeypatch) -> Counter:
    """Count, per kernel module, the calls that dispatch sent to Triton."""
    counts = Counter()
    for op in OPS:
        module = sys.modules[f"mmdit.kernels.{op}"]
        real = module.use_triton

        def spy(x, real=real, op=op):
            chosen = real(x)
            counts[op] += chosen
            return chosen

        monkeypatch.setattr(module, "use_triton", spy)
    return counts


@pytest.mark.parametrize("name", sorted(PEERS))
def test_triton_forced_model_matches_diffusers(name, tmp_path, monkeypatch):
    counts = count_triton_calls(monkeypatch)
    peer = PEERS[name]()
    model = mmdit.load_transformer(save_diffusers_folder(peer, tmp_path / name))
    monkeypatch.setenv("MMDIT_KERNELS", "triton")  # our model only; the peer is diffusers
    err = parity(model, peer, B=2, H=4, W=4, L=3)
    assert err <= PARITY, f"{name}: {err:.2e}"
    assert all(counts[op] > 0 for op in OPS), counts  # every block op really ran in Triton
