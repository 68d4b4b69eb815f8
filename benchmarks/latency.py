"""Latency of one transformer step, ours vs diffusers, same weights, same inputs, one process.

    python benchmarks/latency.py --preset sd3.5-medium --num-layers 4 --resolution 384 \\
        --text-len 333 --dtype fp32 --iters 5 --json latency.json          # CPU
    python benchmarks/latency.py --preset flux.1-dev --resolution 1024 --dtype bf16     # GPU

    python benchmarks/latency.py --preset flux.1-dev --dtype bf16 --modes eager,compiled,cudagraphs  # GPU
    python benchmarks/latency.py --preset chroma --num-layers 4 --resolution 384 --dtype fp32 --iters 5
        # Chroma (CPU): T5 only, a text mask; diffusers' ChromaTransformer2DModel with the same mask (bool)

    torchrun --nproc-per-node 2 benchmarks/latency.py --parallel branch --preset flux.1-dev --dtype bf16
        # several ranks: the step vs one rank, and the communication share (parallel_latency.py)

Cases: one forward (batch B); one CFG step (2B rows); one CFG+DG step, ours as one call
forking the cond rows at block m, diffusers as 3B rows with a hook zeroing the MA channels at
block m. Modes: eager, torch.compile (ours with fullgraph=True) and, on CUDA, torch.compile
with CUDA graphs; each mode compiles both models. Calls are interleaved (the order alternates
every iteration) after warm-up, CUDA is synchronized around each call, and each time is the
median (on CPU also the median process CPU time, steadier than wall time on a machine shared
with other jobs). Also printed: seconds per image (the step times ``--steps``), the DG overhead
(CFG+DG step / CFG step) of both, the achieved TFLOP/s from a FLOP count as a fraction of
this device's measured matmul rate (a GEMM of the MLP's shape) and, on GPU, MFU and peak memory.
"""
from __future__ import annotations

import argparse

import torch

import common
from mmdit.checks import PARALLEL  # noqa: E402  (common puts the checkout on sys.path)


MODES = {"eager": None, "compiled": {}, "cudagraphs": {"mode": "reduce-overhead"}}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_model_args(p)
    p.add_argument("--resolution", default="1024", help="image size in pixels, N or HxW (latent = /8)")
    p.add_argument("--batch", type=int, default=1, help="images per step (B)")
    p.add_argument("--fork-block", type=int, default=None, help="MA block m (default: total_blocks // 2)")
    p.add_argument("--cfg", type=float, default=4.5)
    p.add_argument("--dg", type=float, default=2.0)
    p.add_argument("--cases", default="forward,cfg,cfg_dg",
                   help="comma-separated subset of forward, cfg, cfg_dg, cfg_slg, cfg_dg_slg (SLG: SD3 presets)")
    p.add_argument("--slg", type=float, default=2.8)
    p.add_argument("--slg-layers", default=None,
                   help="blocks SLG skips, e.g. 7,8,9 (default: 3 blocks from 30%% of the depth, never the last; SD3.5's 7-9 of 24)")
    p.add_argument("--modes", default="eager",
                   help="comma-separated: eager, compiled (torch.compile, both models), cudagraphs "
                        "(torch.compile mode='reduce-overhead', CUDA only)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled modes")
    p.add_argument("--steps", type=int, default=28, help="steps per image, for the seconds-per-image column")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--parallel", choices=PARALLEL, default=None,
                   help="under torchrun: time the cfg / cfg_dg step over all ranks in this mode against one rank, "
                        "ours only (see parallel_latency.py)")
    args = p.parse_args(argv)
    if args.parallel:
        args.cases = ",".join(c for c in args.cases.split(",") if c != "forward")
        return args
    modes = args.modes.split(",")
    bad = [m for m in modes if m not in MODES]
    if bad or ("cudagraphs" in modes and not args.device.startswith("cuda")):
        raise SystemExit(f"--modes {args.modes}: choose from {list(MODES)} (cudagraphs needs --device cuda)")
    return args


def compiled(model, mode: str, fullgraph: bool, backend: str):
    """The model as ``mode`` runs it; ours must trace as one graph, diffusers may break."""
    if MODES[mode] is None:
        return model
    return torch.compile(model, fullgraph=fullgraph, backend=backend, **MODES[mode])


def run(args, on_mode=None) -> dict:
    """All modes' results; ``on_mode(out_so_far, mode)`` after each mode (progressive output)."""
    config = common.config_from_args(args)
    device, dtype = torch.device(args.device), common.DTYPES[args.dtype]
    H, _, W = args.resolution.lower().partition("x")
    H, W = int(H), int(W or H)
    if H % 16 or W % 16:
        raise SystemExit(f"--resolution {args.resolution}: height and width must be multiples of 16")
    text_len = common.text_len(args, config)
    m = config.total_blocks // 2 if args.fork_block is None else args.fork_block
    slg_layers = common.slg_layers(config.total_blocks, args.slg_layers)

    peer = common.build_peer(config, device, dtype, args.seed)
    ours = common.ours_from_peer(peer, config)
    runner = common.PeerRunner(peer, config)
    inp = common.make_inputs(config, args.batch, (H // 8, W // 8), text_len, device, dtype)
    common.attach_dg(ours, runner, config, m, args.batch, text_len)  # before compiling: dynamo sees the hook
    n_img = common.tokens(config, (H // 8, W // 8))
    matmul = common.matmul_tflops(device, dtype, args.batch * (n_img + text_len), config.hidden_size,
                                  int(config.hidden_size * config.mlp_ratio))
    dev_name = common.device_name(device)
    peak = common.peak_tflops(dev_name, dtype) if device.type == "cuda" else None
    out = {"benchmark": "latency", **common.environment(device), "preset": args.preset,
            "config": common.config_dict(config), "dtype": str(dtype).removeprefix("torch."),
            "resolution": [H, W], "batch": args.batch, "text_len": text_len, "image_tokens": n_img,
            "fork_block": m, "slg_layers": list(slg_layers), "ma_channels": common.ma_channels(config), "cfg": args.cfg, "dg": args.dg,
            "steps": args.steps, "backend": args.backend, "warmup": args.warmup, "iters": args.iters, "peak_tflops": peak,
            "matmul_tflops": matmul, "modes": {}}
    for mode in args.modes.split(","):
        torch._dynamo.reset()
        runner.peer = compiled(peer, mode, False, args.backend)
        cases = common.build_cases(compiled(ours, mode, True, args.backend), runner, config, inp, m, args.cfg, args.dg,
                                   args.cases.split(","), args.slg, slg_layers)
        out["modes"][mode] = time_cases(cases, args, device, peak, matmul, {"ours": ours, "diffusers": peer},
                                        cudagraphs=mode == "cudagraphs")
        if on_mode is not None:
            on_mode(out, mode)
    runner.peer = peer
    return out


def time_cases(cases, args, device, peak, matmul, models: dict, cudagraphs: bool) -> dict:
    """Interleaved timing of every case, ours and diffusers; -> {"results": {case: ...}, ...}."""
    times = {c.name: {"ours": [], "diffusers": []} for c in cases}
    cpu_times = {c.name: {"ours": [], "diffusers": []} for c in cases}
    errors, peak_mb = {}, {}
    with torch.inference_mode():
        for it in range(args.warmup + args.iters):
            for case in cases:
                pair = [("ours", case.ours), ("diffusers", case.peer)]
                outs = {}
                for impl, fn in pair if it % 2 == 0 else pair[::-1]:
                    if cudagraphs:  # a new step for the CUDA-graph trees: earlier outputs may be overwritten
                        torch.compiler.cudagraph_mark_step_begin()
                    t, cpu, outs[impl] = common.timed(fn, device)
                    if it >= args.warmup:
                        times[case.name][impl].append(t)
                        cpu_times[case.name][impl].append(cpu)
                if case.name not in errors:
                    errors[case.name] = common.rel_err(outs["ours"], outs["diffusers"])
                del outs
        if device.type == "cuda":
            for case in cases:
                for impl, fn in (("ours", case.ours), ("diffusers", case.peer)):
                    peak_mb[case.name, impl] = common.peak_memory_mb(fn, device, models[impl])

    results = {}
    for case in cases:
        t = times[case.name]
        ours_ms, peer_ms = common.median_ms(t["ours"]), common.median_ms(t["diffusers"])
        r = {"rows_ours": case.rows_ours, "rows_diffusers": case.rows_peer,
             "ours_ms": ours_ms, "diffusers_ms": peer_ms, "ratio": ours_ms / peer_ms,
             "ours_all_ms": [1e3 * s for s in t["ours"]], "diffusers_all_ms": [1e3 * s for s in t["diffusers"]],
             "s_per_image_ours": ours_ms * args.steps / 1e3 / args.batch,
             "s_per_image_diffusers": peer_ms * args.steps / 1e3 / args.batch,
             "flops_ours": case.flops_ours, "flops_diffusers": case.flops_peer,
             "tflops_ours": case.flops_ours / ours_ms / 1e9, "tflops_diffusers": case.flops_peer / peer_ms / 1e9,
             "max_rel_err": errors[case.name]}
        r["matmul_fraction_ours"] = r["tflops_ours"] / matmul
        r["matmul_fraction_diffusers"] = r["tflops_diffusers"] / matmul
        if device.type == "cpu":  # less sensitive than wall time to other jobs on a shared machine
            c = cpu_times[case.name]
            r["ours_cpu_ms"], r["diffusers_cpu_ms"] = common.median_ms(c["ours"]), common.median_ms(c["diffusers"])
            r["cpu_ratio"] = r["ours_cpu_ms"] / r["diffusers_cpu_ms"]
        if peak:
            r["mfu_ours"] = r["tflops_ours"] / peak
            r["mfu_diffusers"] = r["tflops_diffusers"] / peak
        if peak_mb:
            r["peak_mb_ours"], r["peak_mb_diffusers"] = peak_mb[case.name, "ours"], peak_mb[case.name, "diffusers"]
        results[case.name] = r
    out = {"results": results}
    if "cfg" in results and "cfg_dg" in results:
        dg, cfg = results["cfg_dg"], results["cfg"]
        out["dg_overhead"] = {
            "ours": dg["ours_ms"] / cfg["ours_ms"], "diffusers": dg["diffusers_ms"] / cfg["diffusers_ms"],
            "flop_model_ours": dg["flops_ours"] / cfg["flops_ours"],
            "flop_model_diffusers": dg["flops_diffusers"] / cfg["flops_diffusers"],
        }
        if device.type == "cpu":
            out["dg_overhead"]["ours_cpu"] = dg["ours_cpu_ms"] / cfg["ours_cpu_ms"]
            out["dg_overhead"]["diffusers_cpu"] = dg["diffusers_cpu_ms"] / cfg["diffusers_cpu_ms"]
    return out


def report(out: dict, modes=None, header: bool = True) -> str:
    """The header and the table of each of ``modes`` (default: all)."""
    lines = [] if not header else [common.describe_model(out) + f", "
             f"{out['resolution'][0]}x{out['resolution'][1]} ({out['image_tokens']} image + {out['text_len']} "
             f"text tokens), batch {out['batch']}, fork block {out['fork_block']}",
             f"device: {out['device']}; torch {out['torch']}, diffusers {out['diffusers']}; "
             f"median of {out['iters']} after {out['warmup']} warm-up, interleaved; "
             f"measured {out['dtype']} matmul rate {out['matmul_tflops']:.4g} TFLOP/s"]
    for mode, m in out["modes"].items():
        if modes is not None and mode not in modes:
            continue
        first = next(iter(m["results"].values()))
        mfu, cpu, mem = "mfu_ours" in first, "cpu_ratio" in first, "peak_mb_ours" in first
        lines.append(f"-- {mode} --")
        head = f"{'case':8s} {'rows ours/diff':>15s} {'ours ms':>10s} {'diffusers ms':>13s} {'ours/diff':>10s} " \
               f"{'s/img ours':>11s} {'diff':>7s} {'TFLOP/s ours':>13s} {'diff':>7s} {'of matmul':>10s}" + \
               (f" {'MFU ours':>9s} {'diff':>6s}" if mfu else "") + (f" {'peak MB ours':>13s} {'diff':>7s}" if mem else "") + \
               (f" {'CPU-time ratio':>15s}" if cpu else "") + f" {'max rel err':>12s}"
        lines.append(head)
        for name, r in m["results"].items():
            row = f"{name:8s} {r['rows_ours'] + ' / ' + r['rows_diffusers']:>15s} {r['ours_ms']:10.1f} " \
                  f"{r['diffusers_ms']:13.1f} {r['ratio']:10.3f} {r['s_per_image_ours']:11.2f} " \
                  f"{r['s_per_image_diffusers']:7.2f} {r['tflops_ours']:13.3f} {r['tflops_diffusers']:7.3f} " \
                  f"{r['matmul_fraction_ours']:10.3f}"
            if mfu:
                row += f" {100 * r['mfu_ours']:8.1f}% {100 * r['mfu_diffusers']:5.1f}%"
            if mem:
                row += f" {r['peak_mb_ours']:13.0f} {r['peak_mb_diffusers']:7.0f}"
            if cpu:
                row += f" {r['cpu_ratio']:15.3f}"
            lines.append(row + f" {r['max_rel_err']:12.2e}")
        if "dg_overhead" in m:
            o = m["dg_overhead"]
            lines.append(f"DG overhead (CFG+DG step / CFG step): ours {o['ours']:.3f}x "
                         f"(FLOP model {o['flop_model_ours']:.3f}x), diffusers {o['diffusers']:.3f}x "
                         f"(FLOP model {o['flop_model_diffusers']:.3f}x)"
                         + (f"; by CPU time: ours {o['ours_cpu']:.3f}x, diffusers {o['diffusers_cpu']:.3f}x"
                            if "ours_cpu" in o else ""))
    return "\n".join(lines)


def main(argv=None):
    args = parse(argv)
    if args.parallel:
        import parallel_latency

        out = parallel_latency.run(args)
        if out["results"]:  # rank 0
            print(parallel_latency.report(out), flush=True)
            if args.json:
                common.write_json(args.json, out)
        return
    shown = []

    def show(out, mode):  # each mode as soon as it is measured: a time limit keeps what finished
        print(report(out, [mode], header=not shown), flush=True)
        shown.append(mode)

    out = run(args, show)
    if args.json:
        common.write_json(args.json, out)


if __name__ == "__main__":
    main()
