"""End to end: a tiny diffusers pipeline folder gives the same image through mmdit.Pipeline."""
import json

import pytest
import torch

import mmdit
from helpers import PIXEL_TOL
from peers import H, PROMPTS, T5_LEN, W, flux_folder, pack, randomize, sd3_folder

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (folder, diffusers pipeline), each built once for the module."""
    cache = {}

    def get(family):
        if family not in cache:
            root = tmp_path_factory.mktemp(family)
            if family == "sd3-medium":  # 3 joint blocks without qk norm or dual attention (diffusers' PAG has neither)
                cache[family] = sd3_folder(root, num_layers=3, dual_attention_layers=(), qk_norm=None)
            else:
                cache[family] = (sd3_folder if family == "sd3" else flux_folder)(root)
        return cache[family]

    return get


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_pipeline_matches_diffusers(saved, monkeypatch, family):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, peer = saved(family)
    ours = mmdit.Pipeline.from_pretrained(folder)
    latents = torch.randn(len(PROMPTS), 16, H // 2, W // 2, generator=torch.Generator().manual_seed(0))
    if family == "sd3":
        kw = dict(steps=3, cfg=4.5)
        ref = peer(PROMPTS, negative_prompt="", num_inference_steps=3, guidance_scale=4.5, height=H, width=W,
                   latents=latents.clone(), max_sequence_length=T5_LEN, output_type="np").images
    else:
        kw = dict(steps=3, cfg=1.0, guidance=3.5)
        ref = peer(PROMPTS, num_inference_steps=3, guidance_scale=3.5, height=H, width=W,
                   latents=pack(latents.clone()), max_sequence_length=T5_LEN, output_type="np").images
    images = ours(PROMPTS, height=H, width=W, latents=latents, max_sequence_length=T5_LEN, output="np", **kw)
    assert images.shape == ref.shape == (len(PROMPTS), H, W, 3)
    err = abs(images - ref).max()
    assert err <= PIXEL_TOL, f"max pixel error {err:.2e}"
    assert ref.std() > 0.01  # the comparison is not between two flat images


def _dpm_on_sd3_sigmas():
    """diffusers' DPM++ 2M configured for flow models as it is for SD3 (flow_prediction, flow sigmas, shift 3),
    stepped over the SD3 schedule of FlowMatchEulerDiscreteScheduler, the schedule our Pipeline uses (its own
    flow sigmas start at shift(0.999) instead of 1, and it hands the model whole-number timesteps)."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    class DPMOnSD3Sigmas(DPMSolverMultistepScheduler):
        def set_timesteps(self, num_inference_steps=None, device=None, **kw):
            super().set_timesteps(num_inference_steps, device=device, **kw)
            sd3 = FlowMatchEulerDiscreteScheduler(shift=self.config.flow_shift)
            sd3.set_timesteps(num_inference_steps, device=device)
            self.sigmas, self.timesteps = sd3.sigmas.cpu(), sd3.timesteps

    return DPMOnSD3Sigmas(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)


def _peer_scheduler(sampler, schedule):
    from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

    if sampler == "dpmpp_2m":
        return _dpm_on_sd3_sigmas()
    if sampler == "heun":
        return FlowMatchHeunDiscreteScheduler(shift=3.0)
    return FlowMatchEulerDiscreteScheduler(shift=3.0, **{f"use_{schedule}_sigmas": True})


@pytest.mark.parametrize("sampler,schedule", [("dpmpp_2m", "default"), ("heun", "default"), ("euler", "karras")])
def test_pipeline_samplers_and_schedules_match_diffusers(saved, monkeypatch, sampler, schedule):
    """Our Pipeline with ``sampler=`` / ``schedule=`` equals StableDiffusion3Pipeline with the matching
    diffusers scheduler swapped in."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, peer = saved("sd3")
    monkeypatch.setattr(peer, "scheduler", _peer_scheduler(sampler, schedule))
    ours = mmdit.Pipeline.from_pretrained(folder)
    latents = torch.randn(1, 16, H // 2, W // 2, generator=torch.Generator().manual_seed(1))
    ref = peer(PROMPTS[:1], negative_prompt="", num_inference_steps=4, guidance_scale=4.5, height=H, width=W,
               latents=latents.clone(), max_sequence_length=T5_LEN, output_type="np").images
    images = ours(PROMPTS[:1], height=H, width=W, latents=latents, max_sequence_length=T5_LEN, output="np",
                  steps=4, cfg=4.5, sampler=sampler, schedule=schedule)
    err = abs(images - ref).max()
    assert err <= PIXEL_TOL, f"max pixel error {err:.2e}"
    assert ref.std() > 0.01


@pytest.mark.parametrize("way", ["slg_fractions", "pag"])
def test_perturbation_guidance_matches_diffusers(saved, monkeypatch, way):
    """SLG as StableDiffusion3Pipeline(skip_guidance_layers=...) between step fractions, PAG as
    StableDiffusion3PAGPipeline; ours runs each as a branch of the cond rows in the one call."""
    from diffusers import StableDiffusion3PAGPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, peer = saved("sd3-medium")
    ours = mmdit.Pipeline.from_pretrained(folder)
    calls = []
    ours.transformer.register_forward_hook(lambda m, a, kw, out: calls.append(out.shape[0]), with_kwargs=True)
    latents = torch.randn(len(PROMPTS), 16, H // 2, W // 2, generator=torch.Generator().manual_seed(0))
    common = dict(num_inference_steps=5, guidance_scale=4.5, height=H, width=W, max_sequence_length=T5_LEN,
                  output_type="np")
    if way == "pag":
        parts = {k: v for k, v in peer.components.items() if k not in ("image_encoder", "feature_extractor")}
        pag = StableDiffusion3PAGPipeline(**parts, pag_applied_layers=["blocks.1"])
        ref = pag(PROMPTS, negative_prompt="", latents=latents.clone(), pag_scale=2.0, **common).images
        kw = dict(pag=2.0, pag_layers=(1,))
    else:
        ref = peer(PROMPTS, negative_prompt="", latents=latents.clone(), skip_guidance_layers=[1, 2],
                   skip_layer_guidance_scale=2.8, skip_layer_guidance_start=0.1, skip_layer_guidance_stop=0.7,
                   **common).images
        kw = dict(slg=2.8, slg_layers=(1, 2), slg_start=0.1, slg_stop=0.7)
    images = ours(PROMPTS, height=H, width=W, latents=latents, steps=5, cfg=4.5, max_sequence_length=T5_LEN,
                  output="np", **kw)
    plain = ours(PROMPTS, height=H, width=W, latents=latents, steps=5, cfg=4.5, max_sequence_length=T5_LEN,
                 output="np")
    err = abs(images - ref).max()
    assert err <= PIXEL_TOL, f"max pixel error {err:.2e}"
    assert abs(images - plain).max() > 10 * PIXEL_TOL  # the guidance changed the image
    B = len(PROMPTS)  # one call per step: [u | c] + B perturbed rows where the term is active
    want = [3 * B] * 5 if way == "pag" else [2 * B, 3 * B, 3 * B, 3 * B, 2 * B]  # steps 1..3: 0.5 < i < 3.5
    assert calls[:5] == want


def test_pipeline_runs_dg_and_cfg_in_one_call_per_step(saved, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, _ = saved("sd3")
    pipe = mmdit.Pipeline.from_pretrained(folder)
    calls = []
    pipe.transformer.register_forward_hook(lambda m, a, kw, out: calls.append(out.shape[0]), with_kwargs=True)
    pipe.transformer.ma = mmdit.MASpec(channels=(1, 5), block=1)
    latents = torch.randn(1, 16, H // 2, W // 2, generator=torch.Generator().manual_seed(0))
    plain = pipe(PROMPTS[:1], height=H, width=W, latents=latents, steps=2, cfg=4.5, output="np",
                 max_sequence_length=T5_LEN)
    calls.clear()
    guided = pipe(PROMPTS[:1], height=H, width=W, latents=latents, steps=2, cfg=4.5, dg=2.0, output="np",
                  max_sequence_length=T5_LEN)
    assert calls == [3, 3]  # [uncond | cond | cond disrupted] in one call per step
    assert abs(guided - plain).max() > 1e-4


def test_pipeline_errors_are_clear(saved, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="not in the local Hugging Face cache"):
        mmdit.Pipeline.from_pretrained("someone/missing-model")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="no model_index.json"):
        mmdit.Pipeline.from_pretrained(tmp_path / "folder")
    folder, _ = saved("sd3")
    pipe = mmdit.Pipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match="multiples of 4"):
        pipe("x", height=30, width=24)
    with pytest.raises(ValueError, match="calibrate-ma"):
        pipe("x", height=H, width=W, dg=2.0, steps=1)
    with pytest.raises(ValueError, match="sampler must be one of 'euler', 'dpmpp_2m', 'heun'; got 'ddim'"):
        pipe("x", height=H, width=W, sampler="ddim")
    with pytest.raises(ValueError, match="schedule must be one of 'default', 'beta', 'karras', 'exponential'"):
        pipe("x", height=H, width=W, schedule="linear")
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
