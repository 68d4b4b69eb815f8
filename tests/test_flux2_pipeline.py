"""FLUX.2 end to end: tiny saved Flux2Pipeline / Flux2KleinPipeline folders give the same images through
mmdit.Pipeline (text to image, one and two reference images, [dev]'s embedded guidance, [klein] distilled
and base with real CFG, Flux2KleinInpaintPipeline's inpainting), img2img against a loop of diffusers'
pieces, the empirical-mu schedule against diffusers' scheduler, DG out of the box, the MA tools and the CLI.

The folders (peers_flux2.pipeline_folder): 31-layer Mistral3 / 28-layer Qwen3 text encoders of width 32
(the hidden states 10/20/30 and 9/18/27 are read), 1 + 1 transformer blocks, a 3-level VAE (8 pixels per
token here, 16 in the real one). diffusers encodes references and inpainting images to the posterior
mode, as we do, so no sampling is patched.
"""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import mmdit
import peers_flux2 as pf
from mmdit.cli import main as cli_main
from mmdit.samplers import flux2_mu, flux2_sigmas
from mmdit.weights.checkpoint import CheckpointError
from peers import fake_hub_cache

diffusers = pytest.importorskip("diffusers")
PIXEL_TOL = 1e-3  # per pixel in [0, 1], the bound for the whole pipeline
SIGMA_TOL = 1e-6
PROMPTS = ["a photo of a cat", "a red dog riding a horse on mars"]
LEN = {"klein": 40, "dev": 160}  # max_sequence_length: the prompts fit (the tiny Mistral template is 120 tokens)
H, W = 32, 48  # pixels; 4 x 6 tokens
CFG = 4.0


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """kind -> (folder, diffusers pipeline): "dev", "base" (klein, is_distilled false), "distilled"
    (a copy of the base folder whose model_index.json says is_distilled true)."""
    from diffusers import Flux2KleinPipeline

    out = {"dev": pf.pipeline_folder(tmp_path_factory.mktemp("dev"), "dev"),
           "base": pf.pipeline_folder(tmp_path_factory.mktemp("klein"), "klein", is_distilled=False)}
    folder, base = out["base"]
    distilled = tmp_path_factory.mktemp("distilled") / "pipe"
    shutil.copytree(folder, distilled)
    index = json.loads((distilled / "model_index.json").read_text())
    (distilled / "model_index.json").write_text(json.dumps({**index, "is_distilled": True}))
    out["distilled"] = distilled, Flux2KleinPipeline(**base.components, is_distilled=True)
    return out


@pytest.fixture(scope="module")
def pipes(folders):
    return {kind: mmdit.Pipeline.from_pretrained(folder) for kind, (folder, _) in folders.items()}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def noise(n=len(PROMPTS), h=H, w=W, seed=0):
    return torch.randn(n, 16, h // 8, w // 8, generator=torch.Generator().manual_seed(seed))


def picture(h, w, seed=0):
    """A smooth random RGB image with an edge, PIL."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / 8.0
    img = np.stack([np.sin(xx + g.uniform(0, 6)) + np.cos(yy * g.uniform(0.5, 2)) for _ in range(3)], -1)
    img[h // 4:h // 2, w // 4:w // 2] += 1.0
    return Image.fromarray(((img - img.min()) / np.ptp(img) * 255).astype(np.uint8))


def check(images, ref, shape):
    assert images.shape == ref.shape == shape
    err = abs(images - ref).max()
    print(f"\nmax pixel error {err:.2e}")
    assert err <= PIXEL_TOL
    assert ref.std() > 0.01  # not flat images


# ---- the schedule -------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 4, 28, 50])
@pytest.mark.parametrize("seq", [16, 1024, 4096, 4300, 4301, 6000])
def test_flux2_sigmas_match_diffusers_scheduler(steps, seq):
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    mu = compute_empirical_mu(seq, steps)
    assert flux2_mu(seq, steps) == pytest.approx(mu, abs=1e-12)
    sched = pf.scheduler()
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)  # as the FLUX.2 pipelines call it
    torch.testing.assert_close(flux2_sigmas(steps, seq), sched.sigmas, atol=SIGMA_TOL, rtol=0)


def test_flux2_sigmas_reference_values():
    """The research notes' values (6.1): 1024^2 (4096 tokens), 50 steps: mu 2.02335; 4 steps: mu 2.29118."""
    assert flux2_mu(4096, 50) == pytest.approx(2.02335, abs=1e-5)
    assert flux2_mu(4096, 4) == pytest.approx(2.29118, abs=1e-5)
    torch.testing.assert_close(flux2_sigmas(4, 4096), torch.tensor([1, .96738, .90814, .76720, 0]), atol=1e-5,
                               rtol=0)
    s = flux2_sigmas(50, 4096)
    torch.testing.assert_close(s[[1, 2, -3, -2, -1]], torch.tensor([.99731, .99452, .23963, .13372, 0]), atol=1e-5,
                               rtol=0)
    karras = flux2_sigmas(8, 1024, schedule="karras")  # re-spaced between the same ends
    assert karras[0] == s[0] and karras[-2] == flux2_sigmas(8, 1024)[-2] and len(karras) == 9


# ---- text to image ------------------------------------------------------------------------------

def test_defaults_per_checkpoint(pipes, tmp_path):
    """[dev] 50 steps with guidance 4.0 and no CFG; [klein] base 50 / CFG 4.0, distilled 4 / no CFG
    (model_index.json's is_distilled; a folder that does not say is base, as Flux2KleinPipeline)."""
    d, b, k = (pipes[n].defaults for n in ("dev", "base", "distilled"))
    assert (d["steps"], d["cfg"], d["guidance"]) == (50, 1.0, 4.0) and pipes["dev"].transformer.config.guidance_embed
    assert (b["steps"], b["cfg"]) == (50, 4.0) and (k["steps"], k["cfg"]) == (4, 1.0)
    assert not pipes["base"].transformer.config.guidance_embed
    assert pipes["dev"].latent_shape(H, W) == (16, H // 8, W // 8)  # the model's x: patchified channels
    folder, _ = pf.pipeline_folder(tmp_path, "klein", is_distilled=None)
    assert "is_distilled" not in json.loads((folder / "model_index.json").read_text())
    assert mmdit.Pipeline.from_pretrained(folder).defaults["cfg"] == 4.0
    with pytest.raises(ValueError, match="multiples of 8"):
        pipes["dev"]("a cat", height=36, width=W, steps=1)


@pytest.mark.parametrize("kind", ["dev", "base", "distilled"])
def test_text_to_image_matches_diffusers(folders, pipes, kind):
    _, peer = folders[kind]
    L = LEN["dev" if kind == "dev" else "klein"]
    ref = peer(prompt=PROMPTS, height=H, width=W, num_inference_steps=3, guidance_scale=CFG, latents=noise(),
               max_sequence_length=L, output_type="np").images
    # dev: CFG is the embedded guidance (4.0 by default); base: real CFG; distilled: none, whatever the scale
    cfg = CFG if kind == "base" else None
    images = pipes[kind](PROMPTS, steps=3, cfg=cfg, height=H, width=W, latents=noise(), max_sequence_length=L,
                         output="np")
    check(images, ref, (2, H, W, 3))


@pytest.mark.parametrize("kind", ["dev", "base", "distilled"])
def test_reference_images_match_diffusers(folders, pipes, kind):
    """One reference (the output takes its cropped size, 64x80 from 70x83) and two of different sizes
    (the second cropped from 66x72 to 64x72), every one in every row of every step (CFG's too)."""
    _, peer = folders[kind]
    L = LEN["dev" if kind == "dev" else "klein"]
    first, second = picture(70, 83, seed=1), picture(66, 72, seed=2)
    common = dict(num_inference_steps=2, guidance_scale=CFG, max_sequence_length=L, output_type="np")
    cfg = CFG if kind == "base" else None
    ref = peer(image=first, prompt=PROMPTS[:1], latents=noise(1, 64, 80), **common).images
    images = pipes[kind](PROMPTS[:1], image=first, steps=2, cfg=cfg, latents=noise(1, 64, 80),
                         max_sequence_length=L, output="np")
    check(images, ref, (1, 64, 80, 3))
    ref = peer(image=[first, second], prompt=PROMPTS, height=H, width=W, latents=noise(), **common).images
    images = pipes[kind](PROMPTS, image=[first, second], steps=2, cfg=cfg, height=H, width=W, latents=noise(),
                         max_sequence_length=L, output="np")
    check(images, ref, (2, H, W, 3))
    plain = pipes[kind](PROMPTS, steps=2, cfg=cfg, height=H, width=W, latents=noise(), max_sequence_length=L,
                        output="np")
    assert abs(images - plain).max() > 10 * PIXEL_TOL  # the references matter


def test_reference_preprocessing_matches_flux2_image_processor(pipes):
    """Area cap (LANCZOS to 1024^2 pixels, sides truncated), floor to the multiple, center crop, as
    Flux2Pipeline's image step; arrays and tensors below the cap are cropped the same way."""
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    from mmdit.image_modes import reference_pixels

    proc = Flux2ImageProcessor(vae_scale_factor=16)
    for h, w in [(1000, 1100), (70, 83), (64, 64)]:
        img = picture(h, w, seed=h)
        ours = reference_pixels(img, 16)[0]
        if w * h > 1024 * 1024:
            img = proc._resize_to_target_area(img, 1024 * 1024)
        want = proc.preprocess(img, height=img.size[1] // 16 * 16, width=img.size[0] // 16 * 16, resize_mode="crop")
        assert ours.shape == want.shape and torch.equal(ours * 2 - 1, want), (h, w)
    small = picture(70, 83)
    as_array = reference_pixels([np.array(small), torch.from_numpy(np.array(small)).permute(2, 0, 1) / 255], 16)
    assert all(torch.equal(t, reference_pixels(small, 16)[0]) for t in as_array)
    with pytest.raises(ValueError, match="at least 16x16"):
        reference_pixels(picture(12, 40), 16)


# ---- img2img and inpainting ---------------------------------------------------------------------

@torch.no_grad()
def img2img_reference(peer, image, strength, steps, seed):
    """Img2img on diffusers' pieces (there is no FLUX.2 img2img pipeline): the FLUX.2 schedule (empirical mu),
    cut by strength as diffusers' ``get_timesteps``, the image's latents noised by ``scale_noise``, real CFG
    against the empty prompt, the scheduler's Euler steps."""
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    B, L = len(PROMPTS), LEN["klein"]
    cond, _ = peer.encode_prompt(prompt=PROMPTS, device="cpu", max_sequence_length=L)
    uncond, _ = peer.encode_prompt(prompt=[""] * B, device="cpu", max_sequence_length=L)
    sched = pf.scheduler()
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=compute_empirical_mu((H // 8) * (W // 8), steps))
    t_start = int(max(steps - min(steps * strength, steps), 0))
    timesteps = sched.timesteps[t_start:]
    sched.set_begin_index(t_start)
    x0 = peer._encode_vae_image(peer.image_processor.preprocess(image, height=H, width=W), None).repeat(B, 1, 1, 1)
    latents = sched.scale_noise(x0, timesteps[:1].repeat(B), noise(seed=seed))
    for t in timesteps:
        sigma = (t / 1000).expand(B)
        v_c, v_u = (pf.run_peer(peer.transformer, latents, sigma, c) for c in (cond, uncond))
        latents = sched.step(v_u + CFG * (v_c - v_u), t, latents).prev_sample
    import peers_vae

    return (peers_vae.flux2_decode(peer.vae, latents) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def test_img2img_matches_diffusers_pieces(folders, pipes):
    """image= with strength < 1 starts from the image (no reference): FLUX.2's img2img, told apart from
    references by the strength, as Kontext's image is (a reference at strength 1)."""
    _, peer = folders["base"]
    image = picture(H, W, seed=5)
    ref = img2img_reference(peer, image, strength=0.7, steps=4, seed=3)
    calls = []
    hook = pipes["base"].transformer.register_forward_hook(lambda m, a, kw, out: calls.append(kw.get("refs")),
                                                           with_kwargs=True)
    try:
        images = pipes["base"](PROMPTS, image=image, strength=0.7, steps=4, max_sequence_length=LEN["klein"],
                               generator=torch.Generator().manual_seed(3), output="np")
    finally:
        hook.remove()
    check(images, ref, (2, H, W, 3))
    assert calls == [None] * 3  # 4 - int(4 - 0.7 * 4) = 3 steps, none with references


def test_inpainting_matches_flux2_klein_inpaint_pipeline(folders, pipes):
    """mask= (white = repaint): Flux2KleinInpaintPipeline's inpainting: start from the image cut by strength,
    the image also a reference, the kept region reset after every step, the mask bilinear on the token grid."""
    from diffusers import Flux2KleinInpaintPipeline

    _, base = folders["base"]
    peer = Flux2KleinInpaintPipeline(**base.components, is_distilled=False)
    image = picture(H, W, seed=6)
    m = np.zeros((H, W), np.uint8)
    m[8:28, 4:30] = 255
    mask = Image.fromarray(m, "L")
    ref = peer(prompt=PROMPTS, image=image, mask_image=mask, strength=0.8, num_inference_steps=4, guidance_scale=CFG,
               generator=torch.Generator().manual_seed(3), max_sequence_length=LEN["klein"], output_type="np").images
    images = pipes["base"](PROMPTS, image=image, mask=mask, strength=0.8, steps=4, max_sequence_length=LEN["klein"],
                           generator=torch.Generator().manual_seed(3), output="np")
    check(images, ref, (2, H, W, 3))


# ---- DG, the MA tools ---------------------------------------------------------------------------

def test_dg_out_of_the_box_one_call_of_three_rows(folders, tmp_path, monkeypatch):
    """dg= on a model with no MA spec calibrates one (the MA policy, on FLUX.2's own inputs and schedule)
    and runs [uncond | cond | cond disrupted] in one call per step; references travel with every row."""
    monkeypatch.setenv("MMDIT_CACHE", str(tmp_path / "cache"))
    pipe = mmdit.Pipeline.from_pretrained(folders["base"][0])
    with torch.no_grad():  # a massive channel for the policy to find: a random tiny model has none
        pipe.transformer.img_in.weight[5] = 10.0
    calls = []
    pipe.transformer.register_forward_hook(
        lambda m, a, kw, out: calls.append((out.shape[0], a[0].shape[0], len(kw.get("refs") or ()))), with_kwargs=True)
    lines = []
    monkeypatch.setattr(mmdit.ma.policy, "_stderr", lines.append)
    kw = dict(image=picture(64, 64, seed=4), steps=2, height=H, width=W, latents=noise(1),
              max_sequence_length=LEN["klein"], output="np")
    plain = pipe(PROMPTS[:1], **kw)
    calls.clear()
    guided = pipe(PROMPTS[:1], dg=2.0, **kw)
    assert pipe.transformer.ma is not None and 5 in pipe.transformer.ma.channels
    assert any("DG: calibrated" in line for line in lines)
    assert calls[-2:] == [(3, 2, 1), (3, 2, 1)]  # 2 rows in, the forked one appended; the reference in the call
    assert abs(guided - plain).max() > 1e-4


def test_ma_tools_on_a_flux2_pipeline(folders, tmp_path, capsys):
    """default_sigmas / the calibration trajectories know FLUX.2 (schedule, latent shape), and
    analyze-ma / calibrate-ma run on a FLUX.2 pipeline folder."""
    from mmdit.ma.report import calibration_samples, default_sigmas

    folder = folders["distilled"][0]
    pipe = mmdit.Pipeline.from_pretrained(folder)
    model = pipe.transformer
    assert torch.equal(default_sigmas(model, 8, 256, 384), flux2_sigmas(8, 16 * 24))
    samples = calibration_samples(model, {"a cat": pipe.encode(["a cat"], 40)}, steps=4, height=H, width=W, every=2)
    assert [tuple(s[0].shape) for s in samples] == [(1, 16, 2, 3)] * 2  # 128 channels at /16 for real sizes
    common = ["--model", str(folder), "--prompt", "a cat", "--steps", "2", "--height", str(H), "--width", str(W),
              "--max-sequence-length", "40", "--ratio", "1.5"]
    assert cli_main(["analyze-ma", *common, "--no-plots", "--out", str(tmp_path / "report")]) == 0
    report = json.loads((tmp_path / "report" / "ma_report.json").read_text())
    assert report["model"]["family"] == "flux2" and report["sigmas"][0] == 1.0
    assert cli_main(["calibrate-ma", *common]) == 0
    assert "spec: channels" in capsys.readouterr().out


# ---- loading: hub id, single file, CLI ----------------------------------------------------------

def test_from_hub_id_and_cli_generate(folders, tmp_path, monkeypatch):
    folder, _ = folders["distilled"]
    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    files = {str(f.relative_to(folder)): f for f in folder.rglob("*") if f.is_file()}
    fake_hub_cache(cache, "black-forest-labs/FLUX.2-klein-4B", files)
    pipe = mmdit.Pipeline.from_pretrained("black-forest-labs/FLUX.2-klein-4B")
    local = mmdit.Pipeline.from_pretrained(folder)
    kw = dict(steps=2, height=H, width=W, latents=noise(1), max_sequence_length=40, output="np")
    assert np.array_equal(pipe(PROMPTS[:1], **kw), local(PROMPTS[:1], **kw))
    picture(64, 80, seed=7).save(tmp_path / "ref.png")
    out = tmp_path / "klein.png"
    argv = ["generate", "--model", "black-forest-labs/FLUX.2-klein-4B", "--prompt", PROMPTS[0], "--steps", "2",
            "--max-sequence-length", "40", "--image", str(tmp_path / "ref.png"), "--output", str(out)]
    assert cli_main(argv) == 0
    settings = json.loads(Image.open(out).text["mmdit"])
    assert settings["cfg"] == 1.0 and Image.open(out).size == (80, 64)  # distilled: no CFG; the reference's size


def test_single_transformer_file_with_text_from(folders, tmp_path):
    """A BFL-layout transformer file + text_from: the same images as the folder; a "base" file name
    means klein base's defaults (BFL's rule), whatever the text_from folder says."""
    folder, peer = folders["distilled"]
    path = pf.save(pf.bfl_state(peer.transformer), tmp_path / "flux-2-klein-base-tiny.safetensors")
    pipe = mmdit.Pipeline.from_pretrained(path, text_from=folder)
    assert (pipe.defaults["steps"], pipe.defaults["cfg"]) == (50, 4.0)
    kw = dict(steps=2, cfg=1.0, height=H, width=W, latents=noise(1), max_sequence_length=40, output="np")
    want = mmdit.Pipeline.from_pretrained(folder)(PROMPTS[:1], **kw)
    assert abs(pipe(PROMPTS[:1], **kw) - want).max() <= 1e-5  # the same weights, another memory layout
    distilled = pf.save(pf.bfl_state(peer.transformer), tmp_path / "flux-2-klein-tiny.safetensors")
    assert mmdit.Pipeline.from_pretrained(distilled, text_from=folder).defaults["steps"] == 4
    with pytest.raises(CheckpointError, match="pass text_from="):
        mmdit.Pipeline.from_pretrained(path)  # a tiny transformer is no official preset
