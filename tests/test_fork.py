"""The MA disruption as rows of the batch: ``disrupt`` in place, ``fork`` appended at block m."""
from dataclasses import replace

import pytest
import torch

import mmdit
from helpers import TOL, inputs, rel_err, tiny

# (family, fork block, streams): SD3 middle and last block; FLUX double, first single, last single.
CASES = [("sd3", 1, ("image",)), ("sd3", 2, ("image",)), ("sd3", 1, ("image", "text")),
         ("flux", 1, ("image",)), ("flux", 2, ("image",)), ("flux", 3, ("image",)),
         ("flux", 2, ("image", "text")), ("flux", 0, ("text",))]


def with_spec(family, block, streams, rho=0.0, token_mask=None):
    model = tiny(family)
    model.ma = mmdit.MASpec(channels=(3, 17, 30), block=block, rho=rho, streams=streams, token_mask=token_mask)
    return model



@pytest.mark.parametrize("family,block,streams", CASES)
def test_fork_rows_equal_disrupted_rows_and_kept_rows_equal_plain(family, block, streams):
    model = with_spec(family, block, streams, rho=lambda s: 0.5 * s)
    x, sigma, ctx, pooled, g = inputs(model)
    fork = torch.tensor([False, True, True])
    with torch.no_grad():
        plain = model(x, sigma, ctx, pooled, guidance=g)
        forked = model(x, sigma, ctx, pooled, guidance=g, fork=fork)
        disrupted = model(x, sigma, ctx, pooled, guidance=g, disrupt=torch.ones(3, dtype=torch.bool))
    assert forked.shape[0] == 5
    assert rel_err(forked[:3], plain) <= TOL
    assert rel_err(forked[3:], disrupted[fork]) <= TOL
    assert rel_err(disrupted, plain) > 1e-3  # the disruption does something


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_disrupt_touches_only_its_rows_and_rho_one_is_identity(family):
    model = with_spec(family, 1, ("image",))
    x, sigma, ctx, pooled, g = inputs(model)
    rows = torch.tensor([True, False, True])
    with torch.no_grad():
        plain = model(x, sigma, ctx, pooled, guidance=g)
        some = model(x, sigma, ctx, pooled, guidance=g, disrupt=rows)
        model.ma = replace(model.ma, rho=1.0)
        identity = model(x, sigma, ctx, pooled, guidance=g, disrupt=rows)
    assert rel_err(some[1], plain[1]) <= TOL
    assert rel_err(some[0], plain[0]) > 1e-3 and rel_err(some[2], plain[2]) > 1e-3
    assert rel_err(identity, plain) <= TOL


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_token_mask_limits_the_disruption_to_its_tokens(family):
    N = 6 * 5  # image tokens of a 12x10 latent
    none = torch.zeros(N, dtype=torch.bool)
    model = with_spec(family, 1, ("image",), token_mask=none)
    x, sigma, ctx, pooled, g = inputs(model)
    with torch.no_grad():
        plain = model(x, sigma, ctx, pooled, guidance=g)
        masked_out = model(x, sigma, ctx, pooled, guidance=g, disrupt=torch.ones(3, dtype=torch.bool))
        model.ma = replace(model.ma, token_mask=torch.arange(N) < N // 2)
        half = model(x, sigma, ctx, pooled, guidance=g, disrupt=torch.ones(3, dtype=torch.bool))
    assert rel_err(masked_out, plain) <= TOL
    assert rel_err(half, plain) > 1e-3


def test_fork_without_spec_or_with_both_masks_is_a_clear_error():
    model = tiny("sd3")
    x, sigma, ctx, pooled, _ = inputs(model)
    with pytest.raises(ValueError, match="need an MA spec"):
        model(x, sigma, ctx, pooled, fork=torch.ones(3, dtype=torch.bool))
    model.ma = mmdit.MASpec(channels=(1,), block=1)
    with pytest.raises(ValueError, match="either disrupt or fork"):
        model(x, sigma, ctx, pooled, fork=torch.ones(3, dtype=torch.bool), disrupt=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="MA block 7 outside 0..2: this model has 3 blocks"):
        model.ma = mmdit.MASpec(channels=(1,), block=7)
    with pytest.raises(ValueError, match=r"MA channels \[32\] outside 0..31: the hidden size is 32"):
        model.ma = mmdit.MASpec(channels=(1, 32), block=1)
