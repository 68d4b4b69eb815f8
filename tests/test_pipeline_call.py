"""Pipeline.__call__ as a library user meets it: seeds per image, callbacks, settings checks,
and DG out of the box (the MA spec found, checked and cached on first use)."""
import numpy as np
import pytest
import torch

import mmdit
from mmdit import ma
from mmdit.pipeline import Pipeline, PixelSpace
from helpers import PLANTED, planted

SAME = 1e-5  # per pixel in [0, 1]: the same noise, batched or alone (fp32 matmuls sum in another order)


@pytest.fixture(scope="module")
def shipped():
    return Pipeline.tiny()


def test_a_seed_per_image_in_prompt_order(shipped):
    batch = shipped(["a red circle on a blue background", "a green square on a white background"],
                    num_images_per_prompt=2, seed=5, steps=3, output="np")
    assert batch.shape == (4, 64, 64, 3)
    alone = shipped("a green square on a white background", seed=8, steps=3, output="np")[0]  # image 3 = seed 5 + 3
    assert np.abs(batch[3] - alone).max() <= SAME
    listed = shipped("a green square on a white background", seed=[8], steps=3, output="np")[0]
    assert np.abs(listed - alone).max() <= SAME
    g = [torch.Generator().manual_seed(8)]
    assert np.abs(shipped("a green square on a white background", generator=g, steps=3, output="np")[0]
                  - alone).max() <= SAME
    assert np.abs(batch[0] - batch[1]).max() > 0.05  # two images of one prompt differ


def test_callback_sees_every_step(shipped):
    seen = []
    shipped("a red circle on a blue background", steps=4, seed=0, output="latent",
            callback=lambda step, sigma, latents: seen.append((step, round(sigma, 6), tuple(latents.shape))))
    assert [s for s, _, _ in seen] == [0, 1, 2, 3] and seen[-1][1] == 0.0 and seen[0][2] == (1, 3, 64, 64)


def test_guidance_on_a_model_without_it_says_so(shipped):
    with pytest.warns(UserWarning, match="guidance=3.5 is ignored: it is FLUX.1-dev's distilled guidance"):
        shipped("a red circle on a blue background", guidance=3.5, steps=1, output="latent")


@pytest.mark.parametrize("kw,message", [
    (dict(steps=0), "steps must be a whole number from 1 to 1000, got 0"),
    (dict(steps=10**9), "from 1 to 1000"),
    (dict(cfg=float("nan")), "cfg must be a finite number >= 0"),
    (dict(dg=-1), "dg must be a finite number >= 0"),
    (dict(dg_interval=(0.5, 0.1)), "dg_interval must be two sigmas with 0 <= start <= stop <= 1"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt must be a whole number from 1 to 256"),
    (dict(seed=3, generator=torch.Generator()), "give seed or generator, not both"),
    (dict(seed=[1, 2]), "2 seeds for 1 images"),
    (dict(height=96), "at most 64 pixels for this model (pixel space, no VAE"),
])
def test_settings_that_cannot_work_are_one_clear_error(shipped, kw, message):
    with pytest.raises(ValueError) as e:
        shipped("a red circle on a blue background", **kw)
    assert message in str(e.value)


# ---- DG out of the box ----------------------------------------------------------------------

def planted_pipeline(tmp_path, monkeypatch, paper=None):
    """A random SD3 model with a planted massive channel, loaded from a file (so it has a cache
    key), without an MA spec; ``paper``: the channels ``ma.paper_channels`` reports for it."""
    from safetensors.torch import save_file

    monkeypatch.setenv("MMDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ma.policy, "paper_channels", lambda config: paper)
    path = tmp_path / "planted.safetensors"
    save_file({k: v.contiguous() for k, v in planted("sd3").state_dict().items()}, str(path))
    model = mmdit.load_transformer(path)
    assert model.ma is None

    def text(prompts, _):
        g = torch.Generator().manual_seed(0)
        return {"context": torch.randn(len(prompts), 5, 32, generator=g),
                "pooled": torch.randn(len(prompts), 24, generator=g)}

    return Pipeline(model, text, PixelSpace(16), "sd3", defaults=dict(size=16, steps=3, cfg=1.0)), path


def test_dg_uses_the_papers_channels_when_they_are_massive_here(tmp_path, monkeypatch, capsys):
    pipe, path = planted_pipeline(tmp_path, monkeypatch, paper=(PLANTED,))
    calls = []
    pipe.transformer.register_forward_hook(lambda *a: calls.append(1))
    pipe("x", dg=2.0, seed=0, output="latent")
    assert calls == [1, 1, 1, 1]  # one probe forward, then the 3 steps
    assert pipe.transformer.ma == mmdit.MASpec(channels=(PLANTED,), block=2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"the paper's channels [{PLANTED}] are massive at block 2" in err[0] and "cached" in err[0]
    assert mmdit.load_transformer(path).ma == pipe.transformer.ma  # the next load finds it in the cache


def test_dg_calibrates_when_the_papers_channels_are_not_massive(tmp_path, monkeypatch, capsys):
    pipe, path = planted_pipeline(tmp_path, monkeypatch, paper=(7,))
    pipe("x", dg=2.0, seed=0, output="latent")
    assert pipe.transformer.ma.channels == (PLANTED,)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "calibrating" in err[0] and f"calibrated the MA channels: [{PLANTED}]" in err[1]
    assert mmdit.load_transformer(path).ma.channels == (PLANTED,)


def test_a_spec_given_by_hand_wins(tmp_path, monkeypatch, capsys):
    pipe, _ = planted_pipeline(tmp_path, monkeypatch, paper=(PLANTED,))
    pipe.transformer.ma = mmdit.MASpec(channels=(9,), block=1)
    pipe("x", dg=2.0, seed=0, output="latent")
    assert pipe.transformer.ma.channels == (9,) and capsys.readouterr().err == ""


def test_no_massive_channel_is_a_clear_error(tmp_path, monkeypatch):
    pipe, _ = planted_pipeline(tmp_path, monkeypatch)
    with torch.no_grad():  # remove the planted channel
        pipe.transformer.joint_blocks[0].x_block.mlp.fc2.bias[PLANTED] = 0.0
    with pytest.raises(ValueError, match="dg needs massive activations, and none were found: no massive channel"):
        pipe("x", dg=2.0, seed=0, output="latent")
    assert pipe.transformer.ma is None
