"""img2img, inpainting, FLUX Fill / Depth-Canny (control) / Kontext: the same images as diffusers.

Each case saves a tiny diffusers pipeline (test_pipeline's components; Fill / control models get
a transformer with their input width), runs it and ``mmdit.Pipeline`` on the same image, mask,
seed and settings, and compares the pixels (<= 1e-3). diffusers draws the VAE posterior with
the generator; mmdit encodes to the posterior mean (as do the published img2img recipes), so
diffusers runs with ``sample()`` returning the mean: then both draw the same noise.
"""
import numpy as np
import pytest
import torch
from PIL import Image

import mmdit
from peers import pack, randomize
from peers import PROMPTS, T5_LEN, flux_folder, sd3_folder

PIXEL_TOL = 1e-3
H, W = 32, 24  # pixels; the tiny VAE downsamples 2x


def make_image(seed=0):
    """A smooth random RGB image with some edges, (H, W, 3) uint8."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W] / 8.0
    img = np.stack([np.sin(xx + g.uniform(0, 6)) + np.cos(yy * g.uniform(0.5, 2)) for _ in range(3)], -1)
    img[8:20, 6:16] += 1.0
    return ((img - img.min()) / np.ptp(img) * 255).astype(np.uint8)


def make_mask():
    m = np.zeros((H, W), np.uint8)
    m[10:26, 4:16] = 255  # white = repaint
    return Image.fromarray(m, "L")


@pytest.fixture(autouse=True)
def posterior_mean(monkeypatch):
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """kind -> (folder, diffusers pipeline), each built once for the module."""
    cache = {}

    def get(kind):
        if kind in cache:
            return cache[kind]
        if kind in ("sd3", "flux"):
            cache[kind] = (sd3_folder if kind == "sd3" else flux_folder)(tmp_path_factory.mktemp(kind))
            return cache[kind]
        import diffusers

        _, base = get("flux")
        cls = {"fill": diffusers.FluxFillPipeline, "control": diffusers.FluxControlPipeline,
               "kontext": diffusers.FluxKontextPipeline}[kind]
        parts = {k: v for k, v in base.components.items() if k in ("scheduler", "vae", "text_encoder", "tokenizer",
                                                                    "text_encoder_2", "tokenizer_2")}
        c_in = {"fill": 4 * (16 + 16 + 4), "control": 4 * 32, "kontext": 64}[kind]  # 2x2 VAE: 4 mask channels
        transformer = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=c_in, out_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=40, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6))
        pipe = cls(transformer=randomize(transformer.eval(), 11), **parts)
        folder = tmp_path_factory.mktemp(kind) / "pipe"
        pipe.save_pretrained(folder)
        cache[kind] = (folder, pipe)
        return cache[kind]

    return get


def compare(ours, theirs):
    assert ours.shape == theirs.shape == (len(PROMPTS), H, W, 3)
    err = abs(ours - theirs).max()
    assert err <= PIXEL_TOL, f"max pixel error {err:.2e}"
    assert theirs.std() > 0.01


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_img2img_and_inpaint_match_diffusers(saved, family, kind):
    import diffusers

    folder, base = saved(family)
    cls = {("sd3", "img2img"): diffusers.StableDiffusion3Img2ImgPipeline,
           ("sd3", "inpaint"): diffusers.StableDiffusion3InpaintPipeline,
           ("flux", "img2img"): diffusers.FluxImg2ImgPipeline,
           ("flux", "inpaint"): diffusers.FluxInpaintPipeline}[family, kind]
    peer = cls(**{k: v for k, v in base.components.items() if v is not None})
    image = Image.fromarray(make_image())
    extra = {"mask_image": make_mask()} if kind == "inpaint" else {}
    guidance = dict(guidance_scale=4.5) if family == "sd3" else dict(guidance_scale=3.5)
    # StableDiffusion3InpaintPipeline decodes latents / scaling without adding the VAE's shift
    # (its img2img and text-to-image pipelines add it): take its latents, decode them as those do.
    latent_out = (family, kind) == ("sd3", "inpaint")
    ref = peer(PROMPTS, image=image, strength=0.7, num_inference_steps=5, height=H, width=W, generator=gen(),
               max_sequence_length=T5_LEN, output_type="latent" if latent_out else "np", **guidance, **extra).images
    if latent_out:
        vae = peer.vae.config
        with torch.no_grad():
            ref = peer.vae.decode(ref / vae.scaling_factor + vae.shift_factor).sample
        ref = (ref / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    ours = mmdit.Pipeline.from_pretrained(folder)
    kw = dict(cfg=4.5) if family == "sd3" else dict(cfg=1.0, guidance=3.5)
    images = ours(PROMPTS, image=make_image(), strength=0.7, steps=5, generator=gen(), output="np",
                  max_sequence_length=T5_LEN, mask=make_mask() if kind == "inpaint" else None, **kw)
    compare(images, ref)


def test_flux_fill_matches_diffusers(saved):
    folder, peer = saved("fill")
    noise = torch.randn(len(PROMPTS), 16, H // 2, W // 2, generator=gen())
    image = Image.fromarray(make_image())
    ref = peer(PROMPTS, image=image, mask_image=make_mask(), num_inference_steps=3, guidance_scale=30.0, height=H,
               width=W, latents=pack(noise), generator=gen(), max_sequence_length=T5_LEN, output_type="np").images
    ours = mmdit.Pipeline.from_pretrained(folder)
    images = ours(PROMPTS, image=image, mask=make_mask(), steps=3, guidance=30.0, latents=noise, output="np",
                  max_sequence_length=T5_LEN)
    compare(images, ref)


def test_flux_control_matches_diffusers(saved):
    folder, peer = saved("control")
    noise = torch.randn(len(PROMPTS), 16, H // 2, W // 2, generator=gen())
    depth = Image.fromarray(make_image(seed=3)).convert("L").convert("RGB")  # a stand-in depth map
    ref = peer(PROMPTS, control_image=depth, num_inference_steps=3, guidance_scale=3.5, height=H, width=W,
               latents=pack(noise), max_sequence_length=T5_LEN, output_type="np").images
    ours = mmdit.Pipeline.from_pretrained(folder)
    images = ours(PROMPTS, control_image=depth, steps=3, guidance=3.5, latents=noise, output="np",
                  max_sequence_length=T5_LEN)
    compare(images, ref)


def test_flux_kontext_matches_diffusers(saved):
    folder, peer = saved("kontext")
    noise = torch.randn(len(PROMPTS), 16, H // 2, W // 2, generator=gen())
    image = Image.fromarray(make_image(seed=5))
    ref = peer(prompt=PROMPTS, image=image, num_inference_steps=3, guidance_scale=3.5, height=H, width=W,
               max_area=H * W, _auto_resize=False, latents=pack(noise), max_sequence_length=T5_LEN,
               output_type="np").images
    ours = mmdit.Pipeline.from_pretrained(folder)
    assert ours.kontext
    images = ours(PROMPTS, image=image, steps=3, guidance=3.5, latents=noise, output="np", max_sequence_length=T5_LEN)
    compare(images, ref)


@pytest.mark.parametrize("kind", ["fill", "kontext"])
def test_cfg_and_dg_stay_one_call_per_step_with_the_conditioning_in_every_row(saved, kind):
    folder, _ = saved(kind)
    pipe = mmdit.Pipeline.from_pretrained(folder)
    pipe.transformer.ma = mmdit.MASpec(channels=(1, 5), block=1)
    seen = []
    pipe.transformer.register_forward_hook(
        lambda m, args, kw, out: seen.append((tuple(args[0].shape[:2]), out.shape[0])), with_kwargs=True)
    kw = dict(image=make_image(), mask=make_mask() if kind == "fill" else None, steps=2, guidance=3.5,
              max_sequence_length=T5_LEN, output="np", seed=0)
    plain = pipe(PROMPTS[:1], cfg=2.0, **kw)
    seen.clear()
    guided = pipe(PROMPTS[:1], cfg=2.0, dg=2.0, **kw)
    channels = 36 if kind == "fill" else 32  # latents + (masked image + mask) or + the reference's latents
    assert seen == [((2, channels), 3)] * 2  # [uncond | cond] in, [.. | cond disrupted] out, once per step
    assert abs(guided - plain).max() > 1e-4


def test_modes_are_picked_from_the_checkpoint_and_the_arguments(saved):
    fill = mmdit.Pipeline.from_pretrained(saved("fill")[0])
    with pytest.raises(ValueError, match="Fill model: give image= and mask="):
        fill("x", image=make_image(), steps=1)
    control = mmdit.Pipeline.from_pretrained(saved("control")[0])
    with pytest.raises(ValueError, match="give control_image="):
        control("x", steps=1, height=H, width=W)
    with pytest.raises(ValueError, match="dg in fill mode needs this model's MA channels"):
        fill("x", image=make_image(), mask=make_mask(), steps=1, dg=2.0)
    sd3 = mmdit.Pipeline.from_pretrained(saved("sd3")[0])
    with pytest.raises(ValueError, match="needs a FLUX.1 Depth / Canny model"):
        sd3("x", control_image=make_image(), steps=1)
    with pytest.raises(ValueError, match="mask= needs image="):
        sd3("x", mask=make_mask(), steps=1)
    for bad in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"strength must be a number in \(0, 1\]"):
            sd3("x", image=make_image(), strength=bad, steps=1)


def test_images_are_accepted_as_pil_numpy_and_tensors(saved):
    pipe = mmdit.Pipeline.from_pretrained(saved("sd3")[0])
    arr = make_image()
    kw = dict(strength=0.5, steps=2, seed=0, output="np", max_sequence_length=T5_LEN)
    want = pipe("x", image=Image.fromarray(arr), **kw)
    for image in (arr, arr / 255.0, torch.from_numpy(arr).permute(2, 0, 1) / 255.0):
        assert abs(pipe("x", image=image, **kw) - want).max() < 1e-5
    assert want.shape == (1, H, W, 3)  # the size comes from the image


def test_tiny_model_img2img_and_inpainting():
    """The shipped pixel-space model (the image is its own latent): a blue image with a red square,
    prompted "a green circle on a yellow background", keeps its colours at strength 0.3 and takes
    the prompt's at 1.0; inpainting the square green leaves every other pixel as it was."""
    from mmdit.tiny.shapes import COLOURS, PALETTE, read_colours

    pipe = mmdit.Pipeline.tiny()
    image = np.zeros((64, 64, 3), np.uint8)
    image[:] = PALETTE["blue"]
    image[20:44, 20:44] = PALETTE["red"]

    def colours(prompt, **kw):
        out = pipe(prompt, image=image, seed=0, output="np", **kw)
        background, shape = read_colours(torch.from_numpy(out).permute(0, 3, 1, 2) * 2 - 1)
        return out[0], COLOURS[background[0]], COLOURS[shape[0]]

    assert colours("a green circle on a yellow background", strength=0.3)[1:] == ("blue", "red")
    assert colours("a green circle on a yellow background", strength=1.0)[1:] == ("yellow", "green")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    out, background, shape = colours("a green square on a blue background", mask=mask)
    assert (background, shape) == ("blue", "green")
    keep = mask == 0
    assert abs(out[keep] - image[keep] / 255).max() < 1e-6


def test_cli_img2img_and_inpaint_on_the_tiny_model(tmp_path, capsys):
    import json

    from mmdit.cli import main

    image = np.zeros((64, 64, 3), np.uint8)
    image[:] = (30, 60, 220)
    Image.fromarray(image).save(tmp_path / "in.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    assert main(["generate", "--prompt", "a green circle on a blue background", "--image", str(tmp_path / "in.png"),
                 "--mask", str(tmp_path / "mask.png"), "--strength", "0.8", "--steps", "4", "--output", str(out)]) == 0
    written = Image.open(out)
    settings = json.loads(written.text["mmdit"])
    assert settings["strength"] == 0.8 and settings["mask"].endswith("mask.png") and written.size == (64, 64)
    assert np.array_equal(np.asarray(written)[:16], image[:16])  # outside the mask: the image itself


@pytest.mark.parametrize("args, message", [
    (["--strength", "0"], "strength must be a number in (0, 1]"),
    (["--strength", "1.5"], "strength must be a number in (0, 1]"),
    (["--mask", "{small}"], "--mask is 32x32 pixels but --image is 64x64"),
    (["--control", "{text}"], "is not an image file"),
    (["--mask", "{missing}"], "no such file"),
])
def test_cli_bad_image_arguments_are_one_line(tmp_path, capsys, args, message):
    from mmdit.cli import main

    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "in.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "small.png")
    (tmp_path / "notes.txt").write_text("not an image")
    paths = dict(small=tmp_path / "small.png", text=tmp_path / "notes.txt", missing=tmp_path / "nope.png")
    argv = ["generate", "--prompt", "x", "--image", str(tmp_path / "in.png"), "--output", str(tmp_path / "o.png")]
    try:
        code = main(argv + [a.format(**paths) for a in args])
    except SystemExit as e:  # argparse's own errors exit
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "o.png").exists()
