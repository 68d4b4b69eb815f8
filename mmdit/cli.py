"""mmdit: text to image with SD3 / SD3.5 / FLUX.1 and Detail Guidance, and tools for massive activations."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import fields
from pathlib import Path

from . import checks

DTYPES = ("float32", "bfloat16", "float16")
EXAMPLES = """examples:
  mmdit generate --prompt "a red circle on a blue background" --output out.png
  mmdit generate --model stabilityai/stable-diffusion-3.5-medium --device cuda --prompt "a fox" --dg 2
  mmdit generate --prompt "a green circle on a yellow background" --image in.png --strength 0.6
  mmdit inspect sd3.5_medium.safetensors
  mmdit quantize flux1-dev.safetensors flux1-dev-Q8_0.gguf --type Q8_0
  mmdit COMMAND --help      the options of one command"""


class _Parser(argparse.ArgumentParser):
    """Bad arguments end in one line (what was wrong, where to look) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Help(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, unless it has none or the help text already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="mmdit", description=__doc__.splitlines()[0], epilog=EXAMPLES, formatter_class=_Help)
    parser.add_argument("--version", action="version", version=f"mmdit {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_generate, _add_inspect, _add_quantize, _add_analyze, _add_calibrate, _add_train):
        add(sub)
    args = parser.parse_args(argv)
    formatwarning = warnings.formatwarning  # warnings as one line each, like the errors
    warnings.formatwarning = lambda message, *rest, **kw: f"mmdit {args.command}: warning: {message}\n"
    try:
        return args.run(args) or 0
    except (ValueError, OSError) as e:  # user-caused: bad path, wrong file, bad settings
        print(f"mmdit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback; nothing half-written is left behind
        print(f"\nmmdit {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = formatwarning


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mmdit-dg")
    except PackageNotFoundError:  # a plain checkout, not installed
        return "(not installed)"


def _command(sub, name: str, help: str, description: str | None = None):
    return sub.add_parser(name, help=help, description=description or help, formatter_class=_Help)


def _checked(check, kind=int):
    """An argparse type: convert with ``kind``, then apply one of ``mmdit.checks``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        try:
            return check(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


STEPS = _checked(checks.steps)
SEED = _checked(checks.seed)


def _count(name, low=1, high=None):
    return _checked(lambda v: checks.count(name, v, low, high))


def _model_args(p) -> None:
    p.add_argument("--model", default=None,
                   help="a hub repo id, a diffusers pipeline folder, a folder written by `mmdit train`, or one "
                        "transformer file (any layout; with --text-from) (default: the shipped tiny-shapes model)")
    p.add_argument("--text-from", default=None, metavar="REPO_OR_FOLDER",
                   help="with --model FILE: the pipeline (repo id or folder) whose text encoders, VAE and scheduler "
                        "go with it (default: the official repo of the file's preset)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--text-device", default=None, help="where the text encoders run (default: --device)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="a LoRA .safetensors or PEFT folder (kohya, OneTrainer, LyCORIS, diffusers / PEFT, ComfyUI or "
                        "XLabs), scale 1 by default; repeatable")
    p.add_argument("--weight-dtype", default=None, choices=("fp8",),
                   help="fp8: keep the transformer's Linear weights in float8_e4m3fn (about half the memory)")


def _pipeline(args):
    import torch

    from .pipeline import Pipeline

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device} asked for a GPU, but torch sees none; use --device cpu")
    loras = [_lora_arg(text) for text in args.lora]
    weight_dtype = torch.float8_e4m3fn if args.weight_dtype == "fp8" else None
    if args.model is None:
        if args.device == "cpu":  # a 0.6M-parameter model: thread hand-offs cost more than they save
            torch.set_num_threads(1)
        return Pipeline.tiny(device=args.device, compile=getattr(args, "compile", False), lora=loras,
                             weight_dtype=weight_dtype, parallel=getattr(args, "parallel", None))
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    return Pipeline.from_pretrained(args.model, dtype=dtype, device=args.device, text_device=args.text_device,
                                    compile=getattr(args, "compile", False), lora=loras, weight_dtype=weight_dtype,
                                    parallel=getattr(args, "parallel", None), text_from=args.text_from)


def _lora_arg(text: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` -> (path, scale); a path with a colon in it is fine when SCALE is absent."""
    path, sep, scale = text.rpartition(":")
    if sep:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return text, 1.0


def _size(args, pipe) -> tuple[int, int]:
    size = pipe.defaults["size"]
    return args.height or size, args.width or size


def _prompt_args(p, many: bool) -> None:
    if many:
        p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
        p.add_argument("--prompts", type=Path, help="a text file with one prompt per line")
    else:
        p.add_argument("--prompt", default=None, help="what to draw")
        p.add_argument("--prompts", type=Path, default=None,
                       help="a text file, one prompt per line: one PNG per line in --outdir, seed --seed + line "
                            "index; files already there are skipped (a stopped run resumes); under torchrun the "
                            "lines are shared among the ranks")
        p.add_argument("--outdir", type=Path, default=None, help="with --prompts: the folder of the PNGs "
                                                                 "(NNNNN.png, NNNNN = the line index)")
    p.add_argument("--negative-prompt", default="", help="the CFG negative prompt (default: empty)")
    p.add_argument("--height", type=_count("height"), default=None, help="pixels (default: the model's native size)")
    p.add_argument("--width", type=_count("width"), default=None, help="pixels (default: the model's native size)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the initial noise: the same seed, settings and "
                                                       "model give the same image")
    p.add_argument("--guidance", type=_checked(lambda v: checks.scale("guidance", v, off=0), float), default=None,
                   help="a guidance-distilled model's embedded guidance (default: 3.5 for FLUX.1-dev, 4.0 for "
                        "FLUX.2-dev; other models have none)")
    p.add_argument("--max-sequence-length", type=_count("max sequence length", 1, 512), default=None,
                   help="text tokens (default: 256 for SD3, 512 for FLUX.1 / FLUX.2)")


def _cache_arg(text: str) -> str:
    from .models.cache import parse

    try:
        parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _compile_arg(text: str) -> str:
    if text != "regional":
        raise argparse.ArgumentTypeError(f"takes nothing (the whole model) or 'regional', got {text!r}")
    return text


def _interval(name):
    return _checked(lambda v: checks.fraction(name, v), float)


def _guidance_args(group) -> None:
    """One flag per field of ``samplers.Guidance`` (and of ``APG``), named after it: --cfg, --dg,
    --slg, --slg-layers, --slg-interval START STOP, --cfg-zero-star, --apg, --apg-eta, ..."""
    from .samplers.guide import APG, Guidance

    for f in fields(Guidance):
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        if "off" in meta:
            off = meta["off"]
            default = None if meta.get("model_default") else f.default
            more = f" (default: the model's)" if default is None else ""
            group.add_argument(flag, type=_checked(lambda v, n=flag, o=off: checks.scale(n, v, off=o), float),
                               default=default, help=f"{meta['help']}, {off:g} = off{more}")
        elif f.name.endswith("_layers"):
            group.add_argument(flag, type=_checked(lambda v, n=flag: checks.layers(n, v), str), default=(),
                               metavar="I,J,...", help=meta["help"])
        elif f.name.endswith("_interval"):
            group.add_argument(flag, type=_interval("a sigma"), nargs=2, metavar=("START", "STOP"),
                               default=None if f.name == "slg_interval" else f.default, help=meta["help"])
        elif f.name == "apg":
            group.add_argument(flag, action="store_true", help=meta["help"])
            for g in fields(APG):
                group.add_argument(f"{flag}-{g.name.replace('_', '-')}", type=_checked(float, float), default=g.default,
                                   help=f"APG: {g.metadata['help']}")
        elif meta.get("model_default"):  # a switch the model turns on or off: --x / --no-x, neither: the model's
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                               help=f"{meta['help']} (default: the model's)")
        else:
            group.add_argument(flag, action="store_true", help=meta["help"])
    group.add_argument("--slg-start", type=_interval("--slg-start"), default=None,
                       help="SLG from this fraction of the steps, as diffusers (default 0.01)")
    group.add_argument("--slg-stop", type=_interval("--slg-stop"), default=None,
                       help="SLG until this fraction of the steps (default 0.2)")


def guide_settings(args) -> dict:
    """The guidance flags as ``Pipeline`` keywords (APG as a dict of its fields), checked by
    building the ``Guidance`` they describe (layers and defaults are the pipeline's to fill)."""
    from .samplers.guide import APG, Guidance

    settings = {}
    for f in fields(Guidance):
        value = getattr(args, f.name)
        if f.name == "apg":
            value = {g.name: getattr(args, f"apg_{g.name}") for g in fields(APG)} if value else None
        elif f.name.endswith(("_layers", "_interval")) and value is not None:
            value = list(value)
        settings[f.name] = value
    probe = {k: v for k, v in settings.items() if v is not None and not k.endswith("_layers")}
    probe["apg"] = None if settings["apg"] is None else APG(**settings["apg"])
    Guidance(**{k: v for k, v in probe.items() if k not in ("slg", "pag")})  # one clear error for bad settings
    return settings


def _add_generate(sub) -> None:
    p = _command(sub, "generate", "text to image, with CFG and Detail Guidance")
    _prompt_args(p, many=False)
    _model_args(p)
    p.add_argument("--steps", type=STEPS, default=None, help="sampling steps, 1-1000 (default: the model's)")
    p.add_argument("--image", default=None, help="start from this image (img2img; with --mask inpainting; "
                                                  "FLUX.1 Kontext models: the image to edit; FLUX.2 at --strength "
                                                  "1: a reference image)")
    p.add_argument("--strength", type=_checked(checks.strength, float), default=1.0,
                   help="with --image: how much of the schedule runs, in (0, 1]; 1 starts from pure noise, "
                        "0.6 keeps the layout")
    p.add_argument("--mask", default=None, help="with --image: white = repaint (FLUX.1 Fill models: fill in)")
    p.add_argument("--control", default=None, help="a FLUX.1 Depth / Canny model's depth map or edge image")
    _guidance_args(p.add_argument_group("guidance (every term but CFG is a copy of the cond rows inside the "
                                        "step's one model call)"))
    p.add_argument("--sampler", choices=checks.SAMPLERS, default="euler",
                   help="the ODE solver: euler (1 model call per step), dpmpp_2m (DPM++ 2M, 1 per step), "
                        "heun (2 per step)")
    p.add_argument("--schedule", choices=checks.SCHEDULES, default="default",
                   help="the spacing of the sigmas: default (the model's own), or karras, exponential or beta "
                        "(re-spaced between the default's first and last sigma)")
    p.add_argument("--output", default=None, help="where to write the PNG, its settings in its metadata "
                                                  "(default: out.png)")
    p.add_argument("--compile", nargs="?", const=True, default=False, type=_compile_arg, metavar="regional",
                   help="compile the transformer: the whole model (one graph per image size; CUDA graphs on CUDA), "
                        "or `--compile regional`, one compiled block per kind of block (much less compile time): "
                        "the first image at a size waits for the compiler, later ones are faster")
    p.add_argument("--cache", type=_cache_arg, default=None, metavar="SPEC",
                   help="step caching: fbcache:THRESHOLD (first-block cache) or teacache:THRESHOLD, optionally "
                        ":first=N:last=N (blocks always computed at the start / end), e.g. fbcache:0.08; "
                        "threshold 0 changes nothing")
    p.add_argument("--parallel", choices=checks.PARALLEL, default=None,
                   help="under torchrun: each image's steps over all ranks, branch (uncond / cond / DG rows on "
                        "different ranks) or sequence (the tokens split, Ulysses attention); without it the "
                        "ranks share the --prompts lines")

    def run(args):
        from . import distributed as parallel

        _check_outputs(args)
        guide_settings(args)  # Guidance's own checks, before anything loads
        images = _input_images(args)
        todo = _lines(args) if args.prompts else [(args.prompt, args.seed, Path(args.output or "out.png"))]
        if args.prompts and not _left_to_draw(args, todo):
            return
        rank, size = parallel.init(args.device)
        try:
            _generate(args, images, todo, rank, size)
        finally:
            parallel.close()

    p.set_defaults(run=run)


def _generate(args, images: dict, todo: list, rank: int, size: int) -> None:
    """Draw the (prompt, seed, path) jobs of ``todo``: one image, or a prompt file's lines shared
    among the ranks (each rank its own) or drawn by all ranks together (``--parallel``)."""
    from . import distributed as parallel

    pipe = _pipeline(args)
    height, width = (args.height, args.width) if images else _size(args, pipe)  # images: their size
    if args.prompts is None:  # one image: rank 0 draws it (with --parallel, every rank helps)
        if rank == 0 or args.parallel:
            _draw(pipe, args, images, height, width, *todo[0], write=rank == 0, progress=rank == 0)
        return
    if args.parallel:  # every rank draws every image; rank 0 decides what is left and writes
        mine = parallel.broadcast([job for job in todo if not job[2].exists()] if rank == 0 else None)
    else:  # the ranks share the lines
        mine = [job for job in parallel.shard(todo, rank, size) if not job[2].exists()]
    for done, (prompt, seed, path) in enumerate(mine, 1):
        start = time.perf_counter()
        writes = rank == 0 or not args.parallel
        _draw(pipe, args, images, height, width, prompt, seed, path, write=writes)
        parallel.progress(rank, size, done, len(mine), f"{'wrote' if writes else 'helped with'} {path} "
                                                       f"({time.perf_counter() - start:.1f}s)")


def _left_to_draw(args, todo: list) -> int:
    """Say what a --prompts run will do before anything loads; the number of images left to draw."""
    if not todo:
        print(f"0 prompts in {args.prompts} (every line is blank): nothing to draw", file=sys.stderr)
        return 0
    there = sum(path.exists() for _, _, path in todo)
    left = len(todo) - there
    if there:
        print(f"{there} of {len(todo)} images already in {args.outdir}" +
              (f"; drawing the other {left}" if left else ": nothing to draw"), file=sys.stderr)
    return left


def _writable(folder: Path, flag: str) -> None:
    """One clear error, before anything loads, when the output can't be written to ``folder``."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag}: {existing} is a file, not a folder; choose another output path")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ValueError(f"{flag}: can't write in {existing} ({e.strerror or e}); choose a folder you can write "
                         "to") from None


def _check_outputs(args) -> None:
    """--prompt with --output, or --prompts with --outdir: checked before anything loads."""
    if (args.prompt is None) == (args.prompts is None):
        raise ValueError("give --prompt (one image) or --prompts FILE (one image per line), not both or neither")
    if args.prompts is not None:
        if args.outdir is None or args.output is not None:
            raise ValueError("--prompts writes one PNG per line into --outdir DIR (not --output)")
        if not args.prompts.is_file():
            raise ValueError(f"--prompts {str(args.prompts)!r}: no such file")
        _writable(args.outdir, "--outdir")
        return
    if args.outdir is not None:
        raise ValueError("--outdir goes with --prompts FILE; for one image give --output FILE.png")
    output = args.output or "out.png"
    if Path(output).suffix.lower() != ".png":
        raise ValueError(f"--output must name a .png file, got {output!r}")
    if Path(output).is_dir():
        raise ValueError(f"--output {output!r} is a folder; name a .png file")
    _writable(Path(output).parent, "--output")


def _lines(args) -> list[tuple[str, int, Path]]:
    """(prompt, seed, path) per non-blank line of --prompts: seed --seed + line index, path
    --outdir/NNNNN.png with NNNNN the line index (blank lines keep their index, so no seed moves)."""
    lines = args.prompts.read_text(encoding="utf-8").splitlines()
    return [(line.strip(), args.seed + i, args.outdir / f"{i:05d}.png") for i, line in enumerate(lines)
            if line.strip()]


def _draw(pipe, args, images: dict, height, width, prompt: str, seed: int, path: Path, *, write: bool,
          progress: bool = False) -> None:
    """One image with the command's settings, written with them in its PNG metadata (``write``),
    through a temporary file so that a stopped run leaves no half-written PNG."""
    from PIL.PngImagePlugin import PngInfo

    from .samplers.guide import APG

    settings = dict(prompt=prompt, negative_prompt=args.negative_prompt, steps=args.steps, guidance=args.guidance,
                    height=height, width=width, seed=seed, max_sequence_length=args.max_sequence_length,
                    sampler=args.sampler, schedule=args.schedule, cache=args.cache, **guide_settings(args))
    if args.slg and args.slg_interval is None:
        settings.update(slg_start=args.slg_start, slg_stop=args.slg_stop)
    if images:
        settings.update(image=args.image, mask=args.mask, control=args.control, strength=args.strength)
    named = ("prompt", "negative_prompt", "image", "mask", "control", "apg")
    inputs = {k: v for k, v in settings.items() if k not in named and v is not None or k in ("cfg", "dg")}
    apg = None if settings.get("apg") is None else APG(**settings["apg"])
    image = pipe(prompt, args.negative_prompt, output="pil", progress=progress, apg=apg, **inputs, **images)[0]
    if not write:
        return
    width, height = image.size
    settings.update(height=height, width=width)
    settings.update(model=args.model or "tiny-shapes (shipped)", **{k: pipe.defaults.get(k) for k in
                                                                   ("steps", "cfg", "dg") if settings[k] is None})
    info = PngInfo()
    info.add_text("mmdit", json.dumps(settings))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    try:
        image.save(partial, format="PNG", pnginfo=info)
        os.replace(partial, path)
    finally:  # interrupted or failed: no half-written file stays
        partial.unlink(missing_ok=True)
    if args.prompts is None:
        print(f"wrote {path} ({width}x{height})")


def _input_images(args) -> dict:
    """--image / --mask / --control opened (PIL), checked before any model loads."""
    from PIL import Image, UnidentifiedImageError

    if args.mask and not args.image:
        raise ValueError("--mask needs --image (the image whose white-masked part is repainted)")
    if args.strength < 1 and not args.image:
        raise ValueError("--strength needs --image (the image to start from)")
    opened = {}
    for flag, key, path in (("--image", "image", args.image), ("--mask", "mask", args.mask),
                            ("--control", "control_image", args.control)):
        if path is None:
            continue
        try:
            with Image.open(path) as im:
                im.load()
                opened[key] = im.copy()
        except FileNotFoundError:
            raise ValueError(f"{flag} {path!r}: no such file") from None
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{flag} {path!r} is not an image file PIL can read ({type(e).__name__})") from None
    if "mask" in opened and opened["mask"].size != opened["image"].size:
        (mw, mh), (iw, ih) = opened["mask"].size, opened["image"].size
        raise ValueError(f"--mask is {mw}x{mh} pixels but --image is {iw}x{ih}; they must be the same size")
    return opened


def _add_inspect(sub) -> None:
    p = _command(sub, "inspect", "what a checkpoint is: layout, family, inferred config, dtype, size")
    p.add_argument("path", help="a .safetensors or .gguf file, an index.json, a diffusers folder or a hub repo id")
    p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE", type=_config_override,
                   help="override an inferred config field, as load_transformer(config={...}) does, e.g. "
                        "--config axes_dim=8,28,28; repeatable")

    def run(args):
        from .weights.inspect import describe

        print(describe(args.path, config=dict(args.config) or None))

    p.set_defaults(run=run)


def _config_override(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` -> (key, value): a Python literal (``8,28,28`` is a tuple), true / false, or the text."""
    import ast

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. axes_dim=8,28,28), got {text!r}")
    flag = {"true": True, "false": False}.get(value.strip().lower())
    if flag is not None:
        return key.strip(), flag
    try:
        return key.strip(), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key.strip(), value


QUANT_TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "BF16", "F16")  # weights.gguf_write.TARGETS, without torch


def _add_quantize(sub) -> None:
    p = _command(sub, "quantize", "write a transformer checkpoint as a GGUF file (ComfyUI-GGUF's layout)",
                 "Write a transformer checkpoint as a GGUF file in ComfyUI-GGUF's layout (original names; "
                 "2-D weights in --type; embedders, final layer and small tensors kept as ComfyUI-GGUF keeps them), "
                 "readable by mmdit, ComfyUI-GGUF and diffusers' GGUFQuantizationConfig.")
    p.add_argument("src", help="a .safetensors file (any layout), a diffusers folder or a hub repo id")
    p.add_argument("out", help="the .gguf file to write")
    p.add_argument("--type", default="Q8_0", choices=QUANT_TYPES, help="the type of the quantized weights")

    def run(args):
        from .weights.gguf_write import quantize_file

        print(quantize_file(args.src, args.out, args.type))

    p.set_defaults(run=run)


def _ma_args(p) -> None:
    _prompt_args(p, many=True)
    _model_args(p)
    p.add_argument("--steps", type=STEPS, default=None, help="steps of the probed trajectories (default: the model's)")
    p.add_argument("--every", type=_count("--every"), default=None, help="probe every n-th step")
    p.add_argument("--block", type=_count("--block", 0), default=None,
                   help="fork block m, 0-based (default: FLUX 28 of 57, SD3 the middle block)")
    p.add_argument("--ratio", type=_checked(lambda v: checks.positive("--ratio", v), float), default=50.0,
                   help="MA rule: a channel's mean |h| over the block's median channel")
    p.add_argument("--absolute", type=_checked(lambda v: checks.positive("--absolute", v), float), default=None,
                   help="MA rule: an absolute mean |h| threshold (default: none)")
    p.add_argument("--top-k", type=_count("--top-k"), default=8, help="keep at most this many channels")


def _tiny_model(args) -> bool:
    """The shipped model (no --model) or a folder written by ``mmdit train``."""
    from .pipeline import is_tiny_folder

    return args.model is None or is_tiny_folder(args.model)


def _ma_inputs(args):
    prompts = list(args.prompt) + (args.prompts.read_text().splitlines() if args.prompts else [])
    pipe = _pipeline(args)
    total = pipe.transformer.config.total_blocks
    if args.block is not None and args.block >= total:
        raise ValueError(f"--block {args.block} is past the last block of this model (it has {total}: 0..{total - 1})")
    prompts = [p for p in prompts if p.strip()] or (
        ["a red circle on a blue background", "a black square on a yellow background"] if _tiny_model(args)
        else ["a photo of a cat", "a red circle on a blue background"])  # the tiny models know only shapes
    height, width = _size(args, pipe)
    shape = pipe.latent_shape(height, width)
    steps = args.steps or pipe.defaults["steps"]
    common = dict(sigmas=pipe.sigmas(steps, shape[1], shape[2]), latent_shape=shape, seed=args.seed,
                  guidance=args.guidance if args.guidance is not None else pipe.defaults.get("guidance"),
                  block=args.block, ratio=args.ratio, absolute=args.absolute, top_k=args.top_k)
    conds = {p: pipe.encode([p], args.max_sequence_length) for p in prompts}
    return pipe, conds, common


def _add_analyze(sub) -> None:
    p = _command(sub, "analyze-ma", "massive-activation report (JSON + PNG plots, the paper's figures)")
    _ma_args(p)
    p.add_argument("--out", default="ma-report", help="output folder")
    p.add_argument("--no-plots", action="store_true", help="write the JSON report only (no matplotlib needed)")

    def run(args):
        import importlib.util

        from .ma.report import run_analyze

        if not args.no_plots and importlib.util.find_spec("matplotlib") is None:
            raise ValueError("the plots need matplotlib, which is not installed: pip install matplotlib "
                             "(or run with --no-plots for the JSON report only)")
        pipe, conds, common = _ma_inputs(args)
        uncond = pipe.encode([args.negative_prompt], args.max_sequence_length)
        report = run_analyze(pipe.transformer, conds, args.out, uncond=uncond, every=args.every or 1,
                             plots=not args.no_plots, **common)
        print(json.dumps(report.get("summary", {k: report[k] for k in list(report)[:4]}), indent=1, default=str))
        print(f"wrote {args.out}/")

    p.set_defaults(run=run)


def _add_calibrate(sub) -> None:
    p = _command(sub, "calibrate-ma", "find the massive channels; cache the spec for this checkpoint")
    _ma_args(p)
    p.add_argument("--rho", type=_checked(lambda v: checks.fraction("--rho", v), float), default=0.0,
                   help="factor for the MA channels in the degraded branch (0 zeroes them)")

    def run(args):
        from . import ma
        from .ma.report import run_calibrate

        pipe, conds, common = _ma_inputs(args)
        files = getattr(pipe.transformer, "source_files", None)
        key = ma.checkpoint_hash(files) if files else None
        cal = run_calibrate(pipe.transformer, conds, key=key, every=args.every or 4, rho=args.rho, **common)
        print(cal.summary())
        if key:
            where = f"cached as {key}"
        elif args.model is not None and _tiny_model(args):  # a tiny folder keeps its spec in config.json
            from .tiny import store_ma

            where = f"stored in {store_ma(args.model, cal.spec, {'command': 'calibrate-ma', **cal.to_json()})}"
        else:
            where = "not stored (the shipped model keeps its own; mmdit calibrate-ma --model FOLDER for a copy)"
        print(f"spec: channels {list(cal.spec.channels)} at block {cal.spec.block}; {where}")

    p.set_defaults(run=run)


def _add_train(sub) -> None:
    p = _command(sub, "train", "train the tiny-shapes model (flow matching, caption dropout)",
                 "Train the tiny-shapes model as the shipped one was trained (the defaults are its\n"
                 "recipe), calibrate its massive channels, and write a folder that\n"
                 "`mmdit generate --model FOLDER` uses.")

    def number(name, check=checks.positive):
        return _checked(lambda v: check(name, v), float)

    p.add_argument("--out", type=Path, default=Path("tiny-shapes"),
                   help="folder to write; `--out weights/tiny` in the checkout replaces the shipped model")
    p.add_argument("--steps", type=_count("--steps"), default=2500, help="optimizer steps")
    p.add_argument("--batch-size", type=_count("--batch-size", 1, 4096), default=16, help="images per step")
    p.add_argument("--lr", type=number("--lr"), default=1e-3, help="AdamW peak learning rate")
    p.add_argument("--text-lr", type=number("--text-lr", lambda n, v: checks.scale(n, v, 0.0)),
                   default=None, help="the text encoder's peak learning rate (default: --lr; 0 freezes it)")
    p.add_argument("--warmup", type=_count("--warmup", 0), default=50,
                   help="linear warm-up steps, then cosine to lr/10")
    p.add_argument("--weight-decay", type=number("--weight-decay", checks.fraction), default=0.01,
                   help="on matrices only")
    p.add_argument("--sigma-mode", choices=("logit_normal", "uniform"), default="logit_normal",
                   help="training noise-level distribution")
    p.add_argument("--sigma-mean", type=float, default=0.0, help="logit-normal mean")
    p.add_argument("--sigma-std", type=number("--sigma-std"), default=1.5, help="logit-normal std")
    p.add_argument("--shift", type=number("--shift"), default=3.0,
                   help="SD3 time shift of the training sigmas; > 1 favours high noise")
    p.add_argument("--caption-dropout", type=number("--caption-dropout", checks.fraction), default=0.12,
                   help="fraction of empty captions, for CFG")
    p.add_argument("--ema", type=_checked(lambda v: checks.fraction("--ema", v, closed_top=False), float),
                   default=0.998, help="EMA decay, 0 = off; the EMA weights are saved")
    p.add_argument("--seed", type=SEED, default=0, help="model init, data, noise")
    p.add_argument("--layers", "--depth", type=_count("--layers"), default=None,
                   help="transformer depth (default: 4)")
    p.add_argument("--width", type=_count("--width", 4), default=None,
                   help="transformer hidden size (default: heads x 32, 64 for the shipped model)")
    p.add_argument("--heads", type=_count("--heads"), default=None,
                   help="transformer heads (default: 2 of 32 channels; with --width, width / 64)")
    p.add_argument("--size", type=_count("--size", 8, 512), default=64, help="image side in pixels")
    p.add_argument("--patch", type=_count("--patch", 1, 32), default=4, help="patch side in pixels")
    p.add_argument("--no-qk-norm", action="store_true", help="no RMSNorm on q and k (as SD3-medium; SD3.5 has it)")
    p.add_argument("--eps", type=number("--eps"), default=1e-8, help="AdamW epsilon")
    p.add_argument("--betas", type=number("--betas", lambda n, v: checks.fraction(n, v, closed_top=False)), nargs=2,
                   default=(0.9, 0.99),
                   metavar=("B1", "B2"), help="AdamW betas")
    p.add_argument("--schedule", choices=("cosine", "constant", "wsd"), default="cosine",
                   help="after the warm-up: cosine to lr/10, constant, or wsd (constant, then linear to 0 "
                        "over the last --decay-steps; resume a constant run as wsd to cool it down)")
    p.add_argument("--decay-steps", type=_count("--decay-steps", 0), default=0,
                   help="wsd: steps of the final linear decay")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (matmuls; the residual stream stays fp32)")
    p.add_argument("--checkpoint-every", type=_count("--checkpoint-every", 0), default=0,
                   help="write OUT/checkpoint.pt (full state) and the EMA weights to OUT every N steps; 0 = never")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt (give the same flags; --steps may grow)")
    p.add_argument("--ma-every", type=_count("--ma-every", 0), default=0,
                   help="append every block's top/median channel ratio and kurtosis to OUT/ma_log.csv "
                        "(and plot it to ma_log.png with matplotlib) every N steps; 0 = never")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    p.add_argument("--threads", type=_count("--threads"), default=None,
                   help="torch CPU threads (1 is fastest on a busy machine; default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--log-every", type=_count("--log-every"), default=25, help="steps between loss lines")
    p.add_argument("--no-calibrate", action="store_true", help="skip the MA calibration after training")
    p.add_argument("--calibrate-only", action="store_true",
                   help="no training: recalibrate the MAs of the model in --out and update its config.json")

    def run(args):
        from .tiny.recipe import run

        return run(args)

    p.set_defaults(run=run)


if __name__ == "__main__":
    sys.exit(main())
