"""Chroma end to end: a tiny saved ChromaPipeline folder gives the same images through mmdit.Pipeline.

diffusers 0.42.1 quirks the references work around (diffusers#13619 and notes/chroma.md):
  * its pipelines build the transformer's text mask as a float tensor, which SDPA adds as a bias of
    +1 / +0 (no masking); the text-to-image reference is ChromaPipeline called with its own prompt
    embeddings and the masks as bool (its documented keywords), the img2img reference
    ChromaImg2ImgPipeline with its ``_prepare_attention_mask`` keeping the bool mask it was given;
  * ChromaInpaintPipeline raises on any Chroma transformer (``config.guidance_embeds``), so the
    inpainting reference is its denoising loop written out here from diffusers' pieces (scheduler,
    transformer, VAE, prompt embeddings), step for step as that pipeline would run it.
diffusers draws the VAE posterior; both sides use its mean (``sample`` patched), as test_image_modes.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import mmdit
from mmdit.cli import main as cli_main
from peers import fake_hub_cache, pack

import peers_chroma as pc

PIXEL_TOL = 1e-3  # per pixel in [0, 1], the bound for the whole pipeline
PROMPTS = ["a photo of an astronaut riding a horse on mars!", "the quick brown fox"]
NEGATIVES = ["blurry", ""]
T5_LEN = 12
H, W = 32, 24  # pixels; the tiny VAE downsamples 2x: 16x12 latents, 8x6 tokens
CFG = 4.0


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return pc.pipeline_folder(tmp_path_factory.mktemp("chroma"))


@pytest.fixture(autouse=True)
def offline_posterior_mean(monkeypatch):
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def noise(seed=0):
    return torch.randn(len(PROMPTS), 16, H // 2, W // 2, generator=torch.Generator().manual_seed(seed))


def make_image(seed=0):
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W] / 8.0
    img = np.stack([np.sin(xx + g.uniform(0, 6)) + np.cos(yy * g.uniform(0.5, 2)) for _ in range(3)], -1)
    img[8:20, 6:16] += 1.0
    return ((img - img.min()) / np.ptp(img) * 255).astype(np.uint8)


def make_mask():
    m = np.zeros((H, W), np.uint8)
    m[10:26, 4:16] = 255  # white = repaint
    return Image.fromarray(m, "L")


def check(images, ref):
    assert images.shape == ref.shape == (len(PROMPTS), H, W, 3)
    err = abs(images - ref).max()
    print(f"\nmax pixel error {err:.2e}")
    assert err <= PIXEL_TOL
    assert ref.std() > 0.01  # not two flat images


def test_text_to_image_matches_chroma_pipeline(saved):
    folder, peer = saved
    latents = noise()
    embeds = pc.peer_embeds(peer, PROMPTS, NEGATIVES, T5_LEN)
    common = dict(num_inference_steps=3, guidance_scale=CFG, height=H, width=W, output_type="np")
    ref = peer(**embeds, latents=pack(latents), **common).images
    pipe = mmdit.Pipeline.from_pretrained(folder)
    assert pipe.family == "chroma" and pipe.transformer.config.family == "chroma"
    images = pipe(PROMPTS, NEGATIVES, steps=3, cfg=CFG, height=H, width=W, latents=latents,
                  max_sequence_length=T5_LEN, output="np")
    check(images, ref)
    # the masks matter here: diffusers' string-prompt path (float masks: no masking) draws another image
    unmasked = peer(PROMPTS, negative_prompt=NEGATIVES, latents=pack(latents), max_sequence_length=T5_LEN,
                    **common).images
    assert abs(unmasked - ref).max() > 10 * PIXEL_TOL


def test_text_mask_keeps_one_pad_token_like_diffusers(saved):
    folder, peer = saved
    pipe = mmdit.Pipeline.from_pretrained(folder)
    cond = pipe.encode(PROMPTS, T5_LEN)
    embeds = pc.peer_embeds(peer, PROMPTS, NEGATIVES, T5_LEN)
    assert cond["context_mask"].dtype == torch.bool
    assert torch.equal(cond["context_mask"], embeds["prompt_attention_mask"])
    assert not cond["context_mask"].all()  # short prompts: padding is masked
    err = pc.rel(cond["context"], embeds["prompt_embeds"])  # T5 run with the tokenizer's mask, as diffusers
    print(f"\nT5 states vs diffusers: {err:.2e}")
    assert err <= 1e-5


def test_img2img_matches_chroma_img2img_pipeline(saved, monkeypatch):
    from diffusers import ChromaImg2ImgPipeline

    folder, base = saved
    peer = ChromaImg2ImgPipeline(**{k: v for k, v in base.components.items() if v is not None})

    def bool_mask(self, batch_size, sequence_length, dtype, attention_mask=None):  # diffusers#13619
        if attention_mask is None:
            return None
        return torch.cat([attention_mask.bool(), torch.ones(batch_size, sequence_length, dtype=torch.bool)], 1)

    monkeypatch.setattr(ChromaImg2ImgPipeline, "_prepare_attention_mask", bool_mask)
    ref = peer(PROMPTS, negative_prompt=NEGATIVES, image=Image.fromarray(make_image()), strength=0.7,
               num_inference_steps=5, guidance_scale=CFG, height=H, width=W, max_sequence_length=T5_LEN,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    pipe = mmdit.Pipeline.from_pretrained(folder)
    images = pipe(PROMPTS, NEGATIVES, image=make_image(), strength=0.7, steps=5, cfg=CFG,
                  max_sequence_length=T5_LEN, generator=torch.Generator().manual_seed(0), output="np")
    check(images, ref)


@torch.no_grad()
def inpaint_reference(pipe, image, mask_image, strength, steps, seed):
    """ChromaInpaintPipeline's loop on diffusers' pieces (its own call raises in 0.42.1): flow-matching Euler
    over the dynamically shifted schedule cut by strength, real CFG, and after every step the kept region
    reset to the image noised to the next timestep (the image itself after the last)."""
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    from diffusers.schedulers import FlowMatchEulerDiscreteScheduler

    embeds = pc.peer_embeds(pipe, PROMPTS, NEGATIVES, T5_LEN)
    vae, B = pipe.vae, len(PROMPTS)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    c = scheduler.config
    mu = calculate_shift((H // 4) * (W // 4), c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    t_start = int(max(steps - min(steps * strength, steps), 0))  # the pipeline's get_timesteps
    timesteps = scheduler.timesteps[t_start:]
    scheduler.set_begin_index(t_start)
    pixels = pipe.image_processor.preprocess(image, height=H, width=W).repeat(B, 1, 1, 1)
    known = (vae.encode(pixels).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
    masks = VaeImageProcessor(vae_scale_factor=2 * pipe.vae_scale_factor, do_normalize=False, do_binarize=True,
                              do_convert_grayscale=True)  # ChromaInpaintPipeline's mask_processor
    repaint = masks.preprocess(mask_image, height=H, width=W)  # binarized, 1 = repaint
    repaint = torch.nn.functional.interpolate(repaint, size=(H // 2, W // 2)).repeat(B, 1, 1, 1)
    eps = torch.randn(B, 16, H // 2, W // 2, generator=torch.Generator().manual_seed(seed))
    latents = scheduler.scale_noise(known, timesteps[:1].repeat(B), eps)
    for i, t in enumerate(timesteps):
        sigma = (t / 1000).expand(B)
        v_c = pc.run_peer(pipe.transformer, latents, sigma, embeds["prompt_embeds"], embeds["prompt_attention_mask"])
        v_u = pc.run_peer(pipe.transformer, latents, sigma, embeds["negative_prompt_embeds"],
                          embeds["negative_prompt_attention_mask"])
        latents = scheduler.step(v_u + CFG * (v_c - v_u), t, latents).prev_sample
        proper = known if i == len(timesteps) - 1 else scheduler.scale_noise(known, timesteps[i + 1:i + 2], eps)
        latents = (1 - repaint) * proper + repaint * latents
    decoded = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
    return (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def test_inpainting_matches_a_reference_built_from_diffusers_pieces(saved):
    folder, peer = saved
    ref = inpaint_reference(peer, Image.fromarray(make_image()), make_mask(), strength=0.8, steps=5, seed=3)
    pipe = mmdit.Pipeline.from_pretrained(folder)
    images = pipe(PROMPTS, NEGATIVES, image=make_image(), mask=make_mask(), strength=0.8, steps=5, cfg=CFG,
                  max_sequence_length=T5_LEN, generator=torch.Generator().manual_seed(3), output="np")
    check(images, ref)
    kept = np.asarray(make_mask()) < 128  # the unmasked pixels stay close to the image (through the VAE)
    plain = pipe(PROMPTS, NEGATIVES, steps=5, cfg=CFG, height=H, width=W, max_sequence_length=T5_LEN,
                 generator=torch.Generator().manual_seed(3), output="np")
    assert abs(images - plain)[:, kept].mean() > 10 * PIXEL_TOL


def test_defaults_schedule_and_dg_out_of_the_box(saved, tmp_path, monkeypatch):
    """The defaults (35 steps, CFG 5, T5 512) and the official sampler's shifted schedule whatever the
    scheduler config says; DG with no MA spec calibrates one (the MA policy) and runs CFG + DG as one
    call of 3 rows per step."""
    from mmdit.samplers import flux_sigmas

    monkeypatch.setenv("MMDIT_CACHE", str(tmp_path / "cache"))  # where the calibrated spec is kept
    folder, _ = saved
    pipe = mmdit.Pipeline.from_pretrained(folder)
    assert (pipe.defaults["steps"], pipe.defaults["cfg"], pipe.defaults["max_sequence_length"]) == (35, 5.0, 512)
    pipe.scheduler = {"use_dynamic_shifting": False, "shift": 1.0}  # a schnell-like scheduler config
    assert torch.equal(pipe.sigmas(35, 128, 128), flux_sigmas(35, 64 * 64))
    assert abs(float(pipe.sigmas(4, 128, 128)[1]) - 0.75) > 0.05  # shifted, not schnell's linear 0.75
    with torch.no_grad():  # a massive channel for the MA policy to find: a random tiny model has none
        pipe.transformer.img_in.bias[5] = 300.0
    calls = []
    pipe.transformer.register_forward_hook(lambda m, a, kw, out: calls.append(out.shape[0]), with_kwargs=True)
    lines = []
    monkeypatch.setattr(mmdit.ma.policy, "_stderr", lines.append)
    plain = pipe(PROMPTS[:1], NEGATIVES[:1], steps=2, height=H, width=W, latents=noise()[:1],
                 max_sequence_length=T5_LEN, output="np")
    guided = pipe(PROMPTS[:1], NEGATIVES[:1], steps=2, dg=2.0, height=H, width=W, latents=noise()[:1],
                  max_sequence_length=T5_LEN, output="np")
    assert pipe.transformer.ma.channels == (5,) and any("DG: calibrated" in line for line in lines)
    assert calls[:2] == [2, 2] and calls[-2:] == [3, 3]  # [uncond | cond], then [uncond | cond | cond disrupted]
    assert abs(guided - plain).max() > 1e-4


def test_from_hub_id_and_cli_generate(saved, tmp_path, monkeypatch, capsys):
    folder, _ = saved
    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    files = {str(f.relative_to(folder)): f for f in folder.rglob("*") if f.is_file()}
    fake_hub_cache(cache, "lodestones/Chroma1-HD", files, not_downloaded=("Chroma1-HD.safetensors",))
    pipe = mmdit.Pipeline.from_pretrained("lodestones/Chroma1-HD")
    local = mmdit.Pipeline.from_pretrained(folder)
    kw = dict(steps=2, cfg=CFG, height=H, width=W, latents=noise()[:1], max_sequence_length=T5_LEN, output="np")
    assert np.array_equal(pipe(PROMPTS[:1], **kw), local(PROMPTS[:1], **kw))
    out = tmp_path / "chroma.png"
    argv = ["generate", "--model", "lodestones/Chroma1-HD", "--prompt", PROMPTS[0], "--negative-prompt", "blurry",
            "--steps", "2", "--height", str(H), "--width", str(W), "--max-sequence-length", str(T5_LEN),
            "--output", str(out)]
    assert cli_main(argv) == 0
    saved_settings = json.loads(Image.open(out).text["mmdit"])
    assert saved_settings["cfg"] == 5.0 and Image.open(out).size == (W, H)
    capsys.readouterr()
    assert cli_main(["inspect", str(folder)]) == 0
    assert "family:       Chroma" in capsys.readouterr().out
