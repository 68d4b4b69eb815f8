"""The ``mmdit`` command: a thin layer over the library. One ``_add_<command>`` per command."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmdit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_generate, _add_inspect, _add_analyze, _add_calibrate, _add_train):
        add(sub)
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except (ValueError, OSError) as e:  # user-caused: bad path, wrong file, bad settings
        print(f"mmdit {args.command}: error: {e}", file=sys.stderr)
        return 2


def _model_args(p) -> None:
    p.add_argument("--model", default=None,
                   help="hub repo id or local diffusers pipeline folder (default: the shipped tiny-shapes model)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--text-device", default=None, help="where the text encoders run (default: --device)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="a LoRA .safetensors (kohya, diffusers, ComfyUI or XLabs keys), scale 1 by default; repeatable")
    p.add_argument("--weight-dtype", default=None, choices=("fp8",),
                   help="fp8: keep the transformer's Linear weights in float8_e4m3fn (about half the memory)")


def _pipeline(args):
    import torch

    from .lora import apply_lora
    from .pipeline import Pipeline

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device} asked for a GPU, but torch sees none; use --device cpu")
    loras = [_lora_arg(text) for text in args.lora]
    weight_dtype = torch.float8_e4m3fn if args.weight_dtype == "fp8" else None
    if args.model is None:
        if args.device == "cpu":  # a 0.6M-parameter model: thread hand-offs cost more than they save
            torch.set_num_threads(1)
        pipe = Pipeline.tiny(device=args.device, compile=getattr(args, "compile", False))
        if weight_dtype is not None:
            from .fp8 import quantize_linears

            quantize_linears(pipe.transformer, weight_dtype)
        for path, scale in loras:
            apply_lora(pipe.transformer, path, scale)
        return pipe
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    return Pipeline.from_pretrained(args.model, dtype=dtype, device=args.device, text_device=args.text_device,
                                    compile=getattr(args, "compile", False), lora=loras, weight_dtype=weight_dtype)


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
        p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="", help="the CFG negative prompt (default: empty)")
    p.add_argument("--height", type=int, default=None, help="pixels (default: the model's native size)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=None, help="FLUX.1-dev distilled guidance (default 3.5)")
    p.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens (default: the pipeline's)")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="text to image, with CFG and Detail Guidance")
    _prompt_args(p, many=False)
    _model_args(p)
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default: the model's)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--dg", type=float, default=None, help="Detail Guidance weight (0 = off)")
    p.add_argument("--output", default="out.png", help="PNG path (default: out.png)")
    p.add_argument("--compile", action="store_true",
                   help="compile the transformer (one graph per image size; CUDA graphs on CUDA): "
                        "the first image at a size waits for the compiler, later ones are faster")

    def run(args):
        from PIL.PngImagePlugin import PngInfo

        pipe = _pipeline(args)
        height, width = _size(args, pipe)
        settings = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps, cfg=args.cfg,
                        dg=args.dg, guidance=args.guidance, height=height, width=width, seed=args.seed,
                        max_sequence_length=args.max_sequence_length)
        image = pipe(args.prompt, args.negative_prompt, output="pil", progress=True,
                     **{k: v for k, v in settings.items() if k not in ("prompt", "negative_prompt")})[0]
        settings.update(model=args.model or "tiny-shapes (shipped)", **{k: pipe.defaults.get(k) for k in
                                                                       ("steps", "cfg", "dg") if settings[k] is None})
        info = PngInfo()
        info.add_text("mmdit", json.dumps(settings))
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        image.save(args.output, pnginfo=info)
        print(f"wrote {args.output} ({width}x{height})")

    p.set_defaults(run=run)


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="what a checkpoint is: layout, family, inferred config, dtype, size")
    p.add_argument("path", help="a .safetensors file, an index.json, a diffusers folder or a hub repo id")

    def run(args):
        from .weights.inspect import describe

        print(describe(args.path))

    p.set_defaults(run=run)


def _ma_args(p) -> None:
    _prompt_args(p, many=True)
    _model_args(p)
    p.add_argument("--steps", type=int, default=None, help="steps of the probed trajectories")
    p.add_argument("--every", type=int, default=None, help="probe every n-th step")
    p.add_argument("--block", type=int, default=None, help="fork block m (default: the family's)")
    p.add_argument("--ratio", type=float, default=50.0, help="MA rule: mean |h| over the block's median channel")
    p.add_argument("--absolute", type=float, default=None, help="MA rule: absolute mean |h| threshold")
    p.add_argument("--top-k", type=int, default=8, help="keep at most this many channels")


def _ma_inputs(args):
    pipe = _pipeline(args)
    prompts = list(args.prompt) + (args.prompts.read_text().splitlines() if args.prompts else [])
    prompts = [p for p in prompts if p.strip()] or ["a photo of a cat", "a red circle on a blue background"]
    height, width = _size(args, pipe)
    shape = pipe.latent_shape(height, width)
    steps = args.steps or pipe.defaults["steps"]
    common = dict(sigmas=pipe.sigmas(steps, shape[1], shape[2]), latent_shape=shape, seed=args.seed,
                  guidance=args.guidance if args.guidance is not None else pipe.defaults.get("guidance"),
                  block=args.block, ratio=args.ratio, absolute=args.absolute, top_k=args.top_k)
    conds = {p: pipe.encode([p], args.max_sequence_length) for p in prompts}
    return pipe, conds, common


def _add_analyze(sub) -> None:
    p = sub.add_parser("analyze-ma", help="massive-activation report (JSON + PNG plots, the paper's figures)")
    _ma_args(p)
    p.add_argument("--out", default="ma-report", help="output folder (default: ma-report)")
    p.add_argument("--no-plots", action="store_true")

    def run(args):
        from .ma_report import run_analyze

        pipe, conds, common = _ma_inputs(args)
        uncond = pipe.encode([args.negative_prompt], args.max_sequence_length)
        report = run_analyze(pipe.transformer, conds, args.out, uncond=uncond, every=args.every or 1,
                             plots=not args.no_plots, **common)
        print(json.dumps(report.get("summary", {k: report[k] for k in list(report)[:4]}), indent=1, default=str))
        print(f"wrote {args.out}/")

    p.set_defaults(run=run)


def _add_calibrate(sub) -> None:
    p = sub.add_parser("calibrate-ma", help="find the massive channels; cache the spec for this checkpoint")
    _ma_args(p)
    p.add_argument("--rho", type=float, default=0.0, help="factor for the MA channels in the degraded branch")

    def run(args):
        from . import ma
        from .ma_report import run_calibrate

        pipe, conds, common = _ma_inputs(args)
        files = getattr(pipe.transformer, "source_files", None)
        key = ma.checkpoint_hash(files) if files else None
        cal = run_calibrate(pipe.transformer, conds, key=key, every=args.every or 4, rho=args.rho, **common)
        print(cal.summary())
        print(f"spec: channels {list(cal.spec.channels)} at block {cal.spec.block}"
              + (f"; cached as {key}" if key else "; not cached (the shipped model keeps its spec in config.json)"))

    p.set_defaults(run=run)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train the tiny-shapes model (flow matching, caption dropout)")

    from .train import add_arguments, run

    add_arguments(p)
    p.set_defaults(run=run)


if __name__ == "__main__":
    sys.exit(main())
