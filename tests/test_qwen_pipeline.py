"""Qwen-Image end to end: tiny saved diffusers pipelines give the same images through mmdit.Pipeline.

* QwenImagePipeline / QwenImageImg2ImgPipeline / QwenImageInpaintPipeline (1.0) with true CFG and its
  norm rescale, prompts and negative prompts of different lengths (one batch here: the shorter text
  padded and masked; two calls there), and QwenImage21Pipeline text to image (no CFG, its default; and
  CFG with a negative prompt of the prompt's length, see test_qwen21_text_to_image).
* The schedule (dynamic exponential shift, stretched to end at 0.02) equals diffusers' scheduler; the
  rescale equals the official pipeline's formula on its packed latents, and DG / SLG are added after it.
* dg= out of the box (the MA policy), one model call per step; the hub id and ``mmdit generate``.

diffusers draws the VAE posterior for img2img / inpainting; both sides use its mean (``sample``
patched), as test_image_modes and test_chroma_pipeline do.
"""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import mmdit
from mmdit.branches import Branch, SkipLayers
from mmdit.cli import main as cli_main
from mmdit.samplers import Guidance, qwen_image_sigmas, sample
from mmdit.samplers.guidance import same_length
from helpers import compile_whole
from peers import fake_hub_cache, pack

import peers_qwen as pq
import peers_qwen_pipeline as qp

PIXEL_TOL = 1e-3  # per pixel in [0, 1], the bound for the whole pipeline
LOOP_TOL = 1e-5  # one guided step vs separate calls, fp32, relative
PROMPTS = ["a photo of a red cat on mars", "a dog"]  # 7 and 2 tokens
NEGATIVES = ["blurry", "a photo of the background and objects"]  # 1 and 7 tokens
H, W = 48, 64  # 1.0: latents 6x8 at 1/8, a 3x4 token grid (odd rows: the centred RoPE's extra row)
H21, W21 = 64, 96  # 2.1: latents 4x6 at 1/16, one token each
CFG = 4.0


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return qp.qwen_folder(tmp_path_factory.mktemp("qwen"))


@pytest.fixture(scope="module")
def ours(saved):
    return mmdit.Pipeline.from_pretrained(saved[0])


@pytest.fixture(autouse=True)
def offline_posterior_mean(monkeypatch):
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def noise(n=2, seed=0):
    return torch.randn(n, 16, H // 8, W // 8, generator=torch.Generator().manual_seed(seed))


def make_image(seed=0):
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W] / 8.0
    img = np.stack([np.sin(xx + g.uniform(0, 6)) + np.cos(yy * g.uniform(0.5, 2)) for _ in range(3)], -1)
    img[8:30, 10:40] += 1.0
    return ((img - img.min()) / np.ptp(img) * 255).astype(np.uint8)


def make_mask():
    m = np.zeros((H, W), np.uint8)
    m[10:34, 8:44] = 255  # white = repaint
    return Image.fromarray(m, "L")


def check(images, ref, shape=(len(PROMPTS), H, W, 3)):
    assert images.shape == ref.shape == shape
    err = abs(images - ref).max()
    print(f"\nmax pixel error {err:.2e}")
    assert err <= PIXEL_TOL
    assert ref.std() > 0.01  # not flat images


def rows_per_call(pipe):
    calls = []
    handle = pipe.transformer.register_forward_hook(lambda m, a, kw, out: calls.append(out.shape[0]),
                                                    with_kwargs=True)
    return calls, handle


# ---- the schedule ----------------------------------------------------------------------------

@pytest.mark.parametrize("steps, tokens", [(50, 4096), (50, 6889), (28, 1000), (3, 12), (2, 24)])
def test_schedule_equals_diffusers(steps, tokens):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    scheduler = qp.scheduler()
    c = scheduler.config
    mu = calculate_shift(tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)  # QwenImagePipeline's call
    got = qwen_image_sigmas(steps, tokens)
    assert got.dtype == torch.float32 and got.shape == (steps + 1,)
    torch.testing.assert_close(got, scheduler.sigmas, atol=1e-6, rtol=0)
    assert abs(float(got[-2]) - 0.02) < 1e-6 and got[0] == 1 and got[-1] == 0


def test_schedule_reference_values_and_one_step():
    s = qwen_image_sigmas(50, 4096)  # 1024^2 (research notes, section 7.1)
    torch.testing.assert_close(s[:2], torch.tensor([1.0, 0.9897]), atol=1e-4, rtol=0)
    torch.testing.assert_close(s[-3:], torch.tensor([0.05848, 0.02, 0.0]), atol=1e-4, rtol=0)
    assert qwen_image_sigmas(1, 4096).tolist() == [1.0, 0.0]  # diffusers: NaN (0 / 0 in its stretch)


# ---- true CFG's norm rescale and the other terms ------------------------------------------------

def tiny_step():
    """A 3-block Qwen-Image transformer with an MA spec, latents (2, 4, 6, 8), a padded prompt batch and
    a negative one of another length."""
    model = mmdit.build_transformer("qwen-image", num_layers=3, num_heads=2, head_dim=16, context_dim=24,
                                    out_channels=4, axes_dim=(8, 4, 4))
    model.ma = mmdit.MASpec(channels=(3, 17), block=1)
    x, _, ctx, mask = pq.qwen_inputs(4, 24, B=2, H=6, W=8, L=7, lengths=(7, 4))
    uncond = {"context": torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(9)),
              "context_mask": pq.padding_mask((3, 5), 5)}
    return model, x, {"context": ctx, "context_mask": mask}, uncond


def test_rescale_is_the_official_formula_and_dg_slg_are_added_after_it():
    """One step through sample() (one call: [uncond | cond | cond MA-disrupted | cond with a block
    skipped]) equals separate calls combined as the official pipeline does, on its packed latents:
    comb = v_u + s (v_c - v_u); comb * |v_c| / |comb| per token (64 channels); then + DG + SLG."""
    model, x, cond, uncond = tiny_step()
    ctx, mask = cond["context"], cond["context_mask"]
    s0, s1, cfg, dg, slg = 0.8, 0.6, 4.0, 1.5, 2.0
    sig = torch.full((2,), s0)
    with torch.no_grad():
        v_c = model(x, sig, ctx, mask)
        v_u = model(x, sig, uncond["context"], uncond["context_mask"])
        v_dg = model(x, sig, ctx, mask, disrupt=slice(0, 2))
        v_slg = model(x, sig, ctx, mask, branches=(Branch(slice(0, 2), SkipLayers((2,))),))[2:]
        comb = pack(v_u) + cfg * (pack(v_c) - pack(v_u))  # (B, tokens, 4 * C): the pipeline's layout
        comb = comb * (torch.norm(pack(v_c), dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
        comb = comb.view(2, 3, 4, 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(2, 4, 6, 8)
        want = x + (s1 - s0) * (comb + dg * (v_c - v_dg) + slg * (v_c - v_slg))
        calls = []
        model.register_forward_hook(lambda m, a, kw, out: calls.append(out.shape[0]), with_kwargs=True)
        got = sample(model, x, [s0, s1], cond, uncond, guide=Guidance(cfg=cfg, cfg_norm=True, dg=dg, slg=slg,
                                                                        slg_layers=(2,)))
        plain = sample(model, x, [s0, s1], cond, uncond, guide=Guidance(cfg=cfg, dg=dg, slg=slg, slg_layers=(2,)))
        no_cfg = [sample(model, x, [s0, s1], cond, None, guide=Guidance(dg=dg, cfg_norm=on)) for on in (True, False)]
    err = ((got - want).abs().max() / want.abs().max()).item()
    print(f"\nrescaled CFG + DG + SLG vs separate calls: {err:.2e}")
    assert err <= LOOP_TOL
    assert calls[0] == 8  # one call: 2 uncond + 2 cond rows in, 2 + 2 perturbed copies appended
    assert (plain - got).abs().max() > 1e-3  # the rescale matters here
    assert torch.equal(no_cfg[0], no_cfg[1])  # without CFG it does nothing


def test_rescaled_cfg_dg_slg_step_is_one_graph():
    """The whole step (batch assembly of the padded texts, one model call with the fork and a branch, the
    rescale and the terms) traces as one graph, and the compiled step equals eager."""
    from mmdit.samplers import guided_velocity

    model, x, cond, uncond = tiny_step()
    cond, uncond = same_length(cond, uncond)  # once per sample(), outside the step
    rule = Guidance(cfg=4.0, cfg_norm=True, dg=2.0, slg=2.5, slg_layers=(2,))

    def step(x):
        return guided_velocity(model, x, 0.7, cond, uncond, rule)[0]

    with torch.no_grad():
        eager, compiled = step(x), compile_whole(step, x)
    assert ((compiled - eager).abs().max() / eager.abs().max()).item() <= LOOP_TOL


def test_same_length_pads_the_shorter_text_with_mask_zero():
    cond = {"context": torch.ones(2, 5, 3), "context_mask": torch.ones(2, 5, dtype=torch.long)}
    uncond = {"context": torch.ones(2, 2, 3), "context_mask": torch.tensor([[1, 1], [1, 0]])}
    c, u = same_length(cond, uncond)
    assert c is cond and u["context"].shape == (2, 5, 3) and u["context"][:, 2:].abs().sum() == 0
    assert u["context_mask"].tolist() == [[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]
    pooled = {"context": torch.ones(1, 5, 3), "pooled": torch.ones(1, 4)}  # no mask: left as it is
    assert same_length(pooled, {"context": torch.ones(1, 2, 3), "pooled": torch.ones(1, 4)})[1]["context"].shape[1] == 2


# ---- the pipelines vs diffusers ----------------------------------------------------------------

def test_text_to_image_matches_qwen_image_pipeline(saved, ours):
    _, peer = saved
    latents = noise()
    ref = peer(PROMPTS, negative_prompt=NEGATIVES, true_cfg_scale=CFG, num_inference_steps=3, height=H, width=W,
               latents=pack(latents), output_type="np").images
    assert ours.family == "qwen-image"
    calls, handle = rows_per_call(ours)
    images = ours(PROMPTS, NEGATIVES, steps=3, height=H, width=W, latents=latents, output="np")
    handle.remove()
    check(images, ref)
    assert calls == [4, 4, 4]  # [uncond | cond], one call per step
    cond, uncond = ours.encode(PROMPTS), ours.encode(NEGATIVES)
    assert cond["context"].shape[1] != uncond["context"].shape[1]  # padded to one batch inside the sampler
    plain = ours(PROMPTS, NEGATIVES, steps=3, height=H, width=W, latents=latents, output="np", cfg_norm=False)
    assert abs(plain - ref).max() > PIXEL_TOL  # the default is the rescaled true CFG: plain CFG is not it


def test_no_negative_prompt_means_no_cfg_as_diffusers(saved, ours):
    _, peer = saved
    latents = noise()
    ref = peer(PROMPTS, true_cfg_scale=CFG, num_inference_steps=2, height=H, width=W, latents=pack(latents),
               output_type="np").images
    calls, handle = rows_per_call(ours)
    images = ours(PROMPTS, None, steps=2, height=H, width=W, latents=latents, output="np")
    handle.remove()
    check(images, ref)
    assert calls == [2, 2]  # cond rows only


def test_img2img_matches_qwen_image_img2img_pipeline(saved, ours):
    from diffusers import QwenImageImg2ImgPipeline

    peer = QwenImageImg2ImgPipeline(**saved[1].components)
    ref = peer(PROMPTS, negative_prompt=NEGATIVES, image=Image.fromarray(make_image()), strength=0.7,
               true_cfg_scale=CFG, num_inference_steps=5, height=H, width=W,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    calls, handle = rows_per_call(ours)
    images = ours(PROMPTS, NEGATIVES, image=make_image(), strength=0.7, steps=5,
                  generator=torch.Generator().manual_seed(0), output="np")
    handle.remove()
    check(images, ref)
    assert calls == [4] * 4  # steps from t_start = int(5 - 5 * 0.7) = 1 (as diffusers), one call each


def test_inpainting_matches_qwen_image_inpaint_pipeline(saved, ours):
    from diffusers import QwenImageInpaintPipeline

    peer = QwenImageInpaintPipeline(**saved[1].components)
    ref = peer(PROMPTS, negative_prompt=NEGATIVES, image=Image.fromarray(make_image()), mask_image=make_mask(),
               strength=0.8, true_cfg_scale=CFG, num_inference_steps=5, height=H, width=W,
               generator=torch.Generator().manual_seed(3), output_type="np").images
    calls, handle = rows_per_call(ours)
    images = ours(PROMPTS, NEGATIVES, image=make_image(), mask=make_mask(), strength=0.8, steps=5,
                  generator=torch.Generator().manual_seed(3), output="np")
    handle.remove()
    check(images, ref)
    assert calls == [4] * 4
    plain = ours(PROMPTS, NEGATIVES, steps=5, height=H, width=W, generator=torch.Generator().manual_seed(3),
                 output="np")
    kept = np.asarray(make_mask()) < 128  # the kept region stays near the image, not a fresh sample
    assert abs(images - plain)[:, kept].mean() > 10 * PIXEL_TOL


def test_qwen21_text_to_image(tmp_path):
    """QwenImage21Pipeline's defaults (no CFG) and its plain CFG; RGBA out, as its VAE and pipeline.
    CFG is compared with a negative prompt of the prompt's token count: with other counts the two
    texts share one batch here, padded, and 2.1 places the target image after the (padded) text in
    its RoPE (frame = text length), where diffusers runs each text alone."""
    folder, peer = qp.qwen21_folder(tmp_path)
    pipe = mmdit.Pipeline.from_pretrained(folder)
    assert pipe.family == "qwen-image-2.1" and (pipe.defaults["steps"], pipe.defaults["cfg"]) == (40, 1.0)
    latents = torch.randn(2, 64, H21 // 16, W21 // 16, generator=torch.Generator().manual_seed(0))
    flat = latents.flatten(2).transpose(1, 2)  # the pipeline's (B, tokens, 64)
    ref = peer(PROMPTS, num_inference_steps=3, height=H21, width=W21, latents=flat, output_type="np").images
    check(pipe(PROMPTS, steps=3, height=H21, width=W21, latents=latents, output="np"), ref, (2, H21, W21, 4))
    ids = pipe.text.tokenize(["a photo", "a dog"])[1].sum(1)
    assert ids[0] == ids[1]
    ref = peer(["a photo"], negative_prompt=["a dog"], true_cfg_scale=3.0, num_inference_steps=3, height=H21,
               width=W21, latents=flat[:1], output_type="np").images
    got = pipe(["a photo"], ["a dog"], cfg=3.0, steps=3, height=H21, width=W21, latents=latents[:1], output="np")
    check(got, ref, (1, H21, W21, 4))
    assert pipe(["a photo"], steps=1, height=H21, width=W21, latents=latents[:1])[0].mode == "RGBA"
    with pytest.raises(ValueError, match="condition image"):  # 2.1's image= is not img2img: not done yet
        pipe(["a photo"], image=np.zeros((H21, W21, 3), np.uint8), steps=1)


# ---- defaults, DG, loading ------------------------------------------------------------------------

def test_defaults_and_schedule_from_the_scheduler_config(ours):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    d = ours.defaults
    assert (d["steps"], d["cfg"], d["cfg_norm"], d["size"], d["max_sequence_length"]) == (50, 4.0, True, 1024, 512)
    assert torch.equal(ours.sigmas(50, 128, 128), qwen_image_sigmas(50, 64 * 64))
    scheduler = qp.scheduler()
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), mu=calculate_shift(12, 256, 8192, 0.5, 0.9))
    torch.testing.assert_close(ours.sigmas(4, H // 8, W // 8), scheduler.sigmas, atol=1e-6, rtol=0)
    assert ours.guide(None, ours.sigmas(4, 6, 8)).cfg_norm and not ours.guide(None, [1, 0], cfg_norm=False).cfg_norm


def test_dg_out_of_the_box_one_call_per_step(saved, tmp_path, monkeypatch):
    """dg= with no MA spec: the MA policy calibrates one on a short cond-only trajectory; then CFG
    (rescaled) + DG is one call of [uncond | cond | cond disrupted] per step."""
    from mmdit.ma import report

    monkeypatch.setenv("MMDIT_CACHE", str(tmp_path / "cache"))
    pipe = mmdit.Pipeline.from_pretrained(saved[0])
    with torch.no_grad():  # a massive channel for the MA policy to find: a random tiny model has none
        pipe.transformer.img_in.bias[5] = 300.0
    lines = []
    monkeypatch.setattr(mmdit.ma.policy, "_stderr", lines.append)
    plain = pipe(PROMPTS[:1], NEGATIVES[:1], steps=2, height=H, width=W, latents=noise(1), output="np")
    calls, handle = rows_per_call(pipe)
    guided = pipe(PROMPTS[:1], NEGATIVES[:1], steps=2, dg=2.0, height=H, width=W, latents=noise(1), output="np")
    handle.remove()
    assert pipe.transformer.ma.channels == (5,) and any("DG: calibrated" in line for line in lines)
    assert calls[-2:] == [3, 3]
    assert abs(guided - plain).max() > 1e-4
    # the trajectories of the policy and `mmdit calibrate-ma / analyze-ma`, with the family's own defaults,
    # probed with a negative prompt of another length
    assert torch.equal(report.default_sigmas(pipe.transformer, 8, 1024, 1024), qwen_image_sigmas(8, 4096))
    samples = report.trajectory_samples(pipe.transformer, {"p": pipe.encode(PROMPTS[:1])},
                                        report.default_sigmas(pipe.transformer, 4, H, W), height=H, width=W, every=2)
    assert [tuple(x.shape) for x, _ in samples.values()] == [(1, 16, 6, 8)] * 2
    stats = report.collect(pipe.transformer, samples, uncond=pipe.encode(NEGATIVES[:1]))
    assert all(set(v) == {"cond", "uncond"} for v in stats.values())


def test_from_hub_id_single_file_and_cli_generate(saved, ours, tmp_path, monkeypatch):
    folder, peer = saved
    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    files = {str(f.relative_to(folder)): f for f in folder.rglob("*") if f.is_file()}
    fake_hub_cache(cache, "Qwen/Qwen-Image", files)
    kw = dict(steps=2, height=H, width=W, latents=noise(1), output="np")
    local = ours(PROMPTS[:1], **kw)
    assert np.array_equal(mmdit.Pipeline.from_pretrained("Qwen/Qwen-Image")(PROMPTS[:1], **kw), local)
    file = pq.peers.save(pq.original_state(peer.transformer), tmp_path / "qwen_image.safetensors")  # ComfyUI's
    single = mmdit.Pipeline.from_pretrained(file, text_from=folder)
    assert np.array_equal(single(PROMPTS[:1], **kw), local)
    official = SimpleNamespace(detected=SimpleNamespace(preset="qwen-image"))
    assert mmdit.pipeline._official_repo(official, file) == "Qwen/Qwen-Image"
    out = tmp_path / "qwen.png"
    argv = ["generate", "--model", "Qwen/Qwen-Image", "--prompt", PROMPTS[0], "--negative-prompt", "blurry",
            "--steps", "2", "--height", str(H), "--width", str(W), "--output", str(out)]
    assert cli_main(argv) == 0
    settings = json.loads(Image.open(out).text["mmdit"])
    assert settings["cfg"] == 4.0 and settings["cfg_norm"] is None and Image.open(out).size == (W, H)
    off = tmp_path / "off.png"
    assert cli_main(argv[:-1] + [str(off), "--no-cfg-norm"]) == 0
    assert json.loads(Image.open(off).text["mmdit"])["cfg_norm"] is False
    assert not np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(off)))
