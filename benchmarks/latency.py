"""Latency and memory of one transformer step: ours alone, or ours vs diffusers on the same
weights and inputs, in one process.

    python benchmarks/latency.py --preset flux.1-dev --dtype bf16 --ours-only \\
        --modes eager,compiled,cudagraphs --json flux.json                  # GPU, ours alone
    python benchmarks/latency.py --preset flux.1-dev --resolution 1024 --dtype bf16     # GPU, vs diffusers
    python benchmarks/latency.py --preset sd3.5-medium --num-layers 4 --resolution 384 \\
        --text-len 333 --dtype fp32 --iters 5 --json latency.json          # CPU
    python benchmarks/latency.py --preset chroma --num-layers 4 --resolution 384 --dtype fp32 --iters 5
        # Chroma (CPU): T5 only, a text mask; diffusers' ChromaTransformer2DModel with the same mask (bool)

    torchrun --nproc-per-node 2 benchmarks/latency.py --parallel branch --preset flux.1-dev --dtype bf16
        # several ranks: the step vs one rank, and the communication share (parallel_latency.py)

Cases: one forward (batch B); one CFG step (2B rows); one CFG+DG step, ours as one call
forking the cond rows at block m, diffusers as 3B rows with a hook zeroing the MA channels at
block m. ``--ours-only``: our model alone with random weights from the preset (no diffusers).
Modes, run in this order: eager; compiled (torch.compile, ``--compile regional``: every block
compiled in place, blocks of a kind sharing the code, ours with fullgraph, diffusers' block lists
the same way; ``--compile whole``: the whole models); cudagraphs (CUDA only: the compiled step
recorded once as a CUDA graph, ``torch.cuda.graph``, and replayed). Calls are interleaved (the
order alternates every iteration) after warm-up, CUDA is synchronized around each call, and each
time is the median (on CPU also the median process CPU time, steadier than wall time on a
machine shared with other jobs). Also: seconds per image (the step times ``--steps``), the DG
overhead (CFG+DG step / CFG step), the achieved TFLOP/s from a FLOP count as a fraction of this
device's datasheet peak (MFU; listed devices only) and of a large square matmul measured in the
same run, and on CUDA the peak memory of each step: the weights plus what the call allocates; for
a CUDA graph, its private pool (the peak is reset before the capture and read after a replay).
Also each case's first call ("first ms": compiles for its shapes, lazy init, a CUDA graph's
warm-up and capture), which is what a cold run pays once.
Each mode's results go to ``--json`` as soon as they are measured (written atomically); a mode or
implementation that fails (a capture, a compile) is recorded with its error and the others run.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback

import torch

import common
from mmdit.checks import PARALLEL  # noqa: E402  (common puts the checkout on sys.path)
from mmdit.compiled import compile_regional  # noqa: E402

MODES = ("eager", "compiled", "cudagraphs")  # the order they run in: compiling changes the models in place


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_model_args(p)
    p.add_argument("--resolution", default="1024", help="image size in pixels, N or HxW (latent = /8)")
    p.add_argument("--batch", type=int, default=1, help="images per step (B)")
    p.add_argument("--fork-block", type=int, default=None, help="MA block m (default: total_blocks // 2)")
    p.add_argument("--cfg", type=float, default=4.5)
    p.add_argument("--dg", type=float, default=2.0)
    p.add_argument("--cases", default="forward,cfg,cfg_dg",
                   help="comma-separated subset of forward, cfg, cfg_dg, cfg_slg, cfg_dg_slg (SLG vs diffusers: SD3)")
    p.add_argument("--slg", type=float, default=2.8)
    p.add_argument("--slg-layers", default=None,
                   help="blocks SLG skips, e.g. 7,8,9 (default: 3 blocks from 30%% of the depth, never the last; SD3.5's 7-9 of 24)")
    p.add_argument("--modes", default="eager", help=f"comma-separated subset of {', '.join(MODES)} (cudagraphs: CUDA only)")
    p.add_argument("--compile", choices=("regional", "whole"), default="regional",
                   help="what the compiled modes compile: each block (default; minutes less for deep models) or the whole model")
    p.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled modes")
    p.add_argument("--ours-only", action="store_true", help="our model alone, random weights from the preset (no diffusers)")
    p.add_argument("--mm-size", type=int, default=None,
                   help="side of the square matmul timed as this device's measured peak (default: 8192 on CUDA, 512 elsewhere)")
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
    args.modes = ",".join(m for m in MODES if m in modes)
    return args


def compile_models(ours, peer, how: str, backend: str):
    """(ours, peer) as the compiled modes run them: ``regional`` compiles each block in place (ours
    with fullgraph; diffusers' blocks may break), ``whole`` wraps each model."""
    if how == "whole":
        return (torch.compile(ours, fullgraph=True, dynamic=False, backend=backend),
                None if peer is None else torch.compile(peer, dynamic=False, backend=backend))
    # one process runs every case (forward, CFG, CFG+DG, SLG: batch sizes, the fork block) through the
    # same blocks' code, more variants than dynamo's default 8 per code object; a pipeline runs a few
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    compile_regional(ours, backend=backend)
    if peer is not None:  # diffusers' block lists: transformer_blocks, single_transformer_blocks
        for name, blocks in peer.named_children():
            if isinstance(blocks, torch.nn.ModuleList) and name.endswith("blocks"):
                for block in blocks:
                    block.compile(dynamic=False, backend=backend)
    return ours, peer


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

    if args.ours_only:
        peer = runner = None
        ours = common.build_ours(config, device, dtype, args.seed)
    else:
        peer = common.build_peer(config, device, dtype, args.seed)
        ours = common.ours_from_peer(peer, config)
        runner = common.PeerRunner(peer, config)
    models = {"ours": ours, "diffusers": peer}
    inp = common.make_inputs(config, args.batch, (H // 8, W // 8), text_len, device, dtype)
    common.attach_dg(ours, runner, config, m, args.batch, text_len)  # before compiling: dynamo sees the hook
    n_img = common.tokens(config, (H // 8, W // 8))
    n = args.mm_size or (8192 if device.type == "cuda" else 512)
    matmul = common.matmul_tflops(device, dtype, n, n, n)
    peak = common.peak_tflops(common.device_name(device), dtype) if device.type == "cuda" else None
    out = {"benchmark": "latency", **common.environment(device), "preset": args.preset,
           "config": common.config_dict(config), "dtype": str(dtype).removeprefix("torch."),
           "resolution": [H, W], "batch": args.batch, "text_len": text_len, "image_tokens": n_img,
           "fork_block": m, "slg_layers": list(slg_layers), "ma_channels": common.ma_channels(config), "cfg": args.cfg,
           "dg": args.dg, "steps": args.steps, "compile": args.compile, "backend": args.backend,
           "ours_only": args.ours_only, "warmup": args.warmup, "iters": args.iters, "peak_tflops": peak,
           "matmul_tflops": matmul, "matmul_shape": [n, n, n], "modes": {}}
    step_ours, step_peer = ours, peer
    for mode in args.modes.split(","):
        try:
            if mode != "eager" and step_ours is ours:  # once: cudagraphs records the compiled step
                step_ours, step_peer = compile_models(ours, peer, args.compile, args.backend)
            if runner is not None:
                runner.peer = step_peer
            cases = common.build_cases(step_ours, runner, config, inp, m, args.cfg, args.dg, args.cases.split(","),
                                       args.slg, slg_layers)
            out["modes"][mode] = time_cases(cases, args, device, peak, matmul, models, graphs=mode == "cudagraphs")
        except Exception as e:  # noqa: BLE001  one mode's failure must not lose the others' results
            traceback.print_exc()
            out["modes"][mode] = {"error": f"{type(e).__name__}: {e}"}
        if on_mode is not None:
            on_mode(out, mode)
    if runner is not None:
        runner.peer = peer
    return out


def cuda_graph(fn, device, model) -> tuple[object, float]:
    """(replay, peak MiB): ``fn``'s work recorded once as a CUDA graph (after two warm-up calls on a
    side stream: compiles, lazy init); ``replay()`` runs it again on the same inputs and returns the
    recorded output. The peak is the model's weights plus the most the capture and a replay held above
    what was allocated before: the graph's private pool included."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        fn(), fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    common.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = fn()
    graph.replay()
    common.synchronize(device)
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    peak = (weights + torch.cuda.max_memory_allocated(device) - before) / 2 ** 20

    def replay():
        graph.replay()
        return result
    return replay, peak


def time_cases(cases, args, device, peak, matmul, models: dict, graphs: bool) -> dict:
    """Interleaved timing of every case, ours (and diffusers); -> {"results": {case: ...}, ...}."""
    impls = ("ours",) if cases[0].peer is None else ("ours", "diffusers")
    fns = {(c.name, impl): c.ours if impl == "ours" else c.peer for c in cases for impl in impls}
    times = {key: [] for key in fns}
    cpu_times = {key: [] for key in fns}
    errors, failed, peak_mb = {}, {}, {}
    first = {}  # the first call's time: compiles (this case's shapes), lazy init, a graph's capture
    with torch.inference_mode():
        if graphs:
            for key, fn in list(fns.items()):
                try:
                    t0 = time.perf_counter()
                    fns[key], peak_mb[key] = cuda_graph(fn, device, models[key[1]])
                    first[key] = time.perf_counter() - t0
                except Exception as e:  # noqa: BLE001  e.g. a host sync inside diffusers' step
                    print(f"{key[1]} {key[0]}: no CUDA graph: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                    failed[key] = f"CUDA graph capture failed: {type(e).__name__}: {e}"
                    del fns[key]
                    torch.cuda.synchronize(device)
        for it in range(args.warmup + args.iters):
            for case in cases:
                pair = [(impl, fns[case.name, impl]) for impl in impls if (case.name, impl) in fns]
                outs = {}
                for impl, fn in pair if it % 2 == 0 else pair[::-1]:
                    t, cpu, outs[impl] = common.timed(fn, device)
                    first.setdefault((case.name, impl), t)
                    if it >= args.warmup:
                        times[case.name, impl].append(t)
                        cpu_times[case.name, impl].append(cpu)
                if len(outs) == 2 and case.name not in errors:
                    errors[case.name] = common.rel_err(outs["ours"], outs["diffusers"])
                del outs
        if device.type == "cuda" and not graphs:
            for key, fn in fns.items():
                peak_mb[key] = common.peak_memory_mb(fn, device, models[key[1]])

    results = {}
    for case in cases:
        r = {}
        for impl in impls:
            key, tag = (case.name, impl), "ours" if impl == "ours" else "diffusers"
            r[f"rows_{tag}"] = case.rows_ours if impl == "ours" else case.rows_peer
            if key in failed:
                r[f"error_{tag}"] = failed[key]
                continue
            ms = common.median_ms(times[key])
            flops = case.flops_ours if impl == "ours" else case.flops_peer
            r.update({f"{tag}_ms": ms, f"{tag}_all_ms": [1e3 * t for t in times[key]],
                      f"{tag}_first_ms": 1e3 * first[key],
                      f"s_per_image_{tag}": ms * args.steps / 1e3 / args.batch, f"flops_{tag}": flops,
                      f"tflops_{tag}": flops / ms / 1e9, f"matmul_fraction_{tag}": flops / ms / 1e9 / matmul})
            if peak:
                r[f"mfu_{tag}"] = r[f"tflops_{tag}"] / peak
            if key in peak_mb:
                r[f"peak_mb_{tag}"] = peak_mb[key]
            if device.type == "cpu":  # less sensitive than wall time to other jobs on a shared machine
                r[f"{tag}_cpu_ms"] = common.median_ms(cpu_times[key])
        if "ours_ms" in r and "diffusers_ms" in r:
            r["ratio"] = r["ours_ms"] / r["diffusers_ms"]
            r["max_rel_err"] = errors[case.name]
            if device.type == "cpu":
                r["cpu_ratio"] = r["ours_cpu_ms"] / r["diffusers_cpu_ms"]
        results[case.name] = r
    out = {"results": results}
    dg, cfg = results.get("cfg_dg", {}), results.get("cfg", {})
    overhead = {}
    for impl in ("ours", "diffusers"):
        if f"{impl}_ms" in dg and f"{impl}_ms" in cfg:
            overhead[impl] = dg[f"{impl}_ms"] / cfg[f"{impl}_ms"]
            overhead[f"flop_model_{impl}"] = dg[f"flops_{impl}"] / cfg[f"flops_{impl}"]
            if device.type == "cpu":
                overhead[f"{impl}_cpu"] = dg[f"{impl}_cpu_ms"] / cfg[f"{impl}_cpu_ms"]
    if overhead:
        out["dg_overhead"] = overhead
    return out


def report(out: dict, modes=None, header: bool = True) -> str:
    """The header and the table of each of ``modes`` (default: all): a row per case and
    implementation, then ours / diffusers where both ran."""
    peak = out["peak_tflops"]
    lines = [] if not header else [
        common.describe_model(out) + f", {out['resolution'][0]}x{out['resolution'][1]} ({out['image_tokens']} image + "
        f"{out['text_len']} text tokens), batch {out['batch']}, fork block {out['fork_block']}"
        + (", ours alone (random weights)" if out["ours_only"] else ", ours and diffusers on the same weights"),
        f"device: {out['device']}; torch {out['torch']}, diffusers {out['diffusers']}; median of {out['iters']} after "
        f"{out['warmup']} warm-up, interleaved; compiled: {out['compile']} ({out['backend']})",
        f"MFU: against the datasheet peak, {peak:.4g} TFLOP/s" if peak else "MFU: no datasheet peak for this device",
        f"measured {out['dtype']} matmul {'x'.join(map(str, out['matmul_shape']))}: {out['matmul_tflops']:.4g} TFLOP/s "
        "(the 'of mm' column)"]
    for mode, m in out["modes"].items():
        if modes is not None and mode not in modes:
            continue
        if "error" in m:
            lines.append(f"-- {mode} -- FAILED: {m['error']}")
            continue
        lines.append(f"-- {mode} --")
        lines.append(f"{'case':10s} {'impl':9s} {'rows':>6s} {'ms':>10s} {'s/img':>7s} {'TFLOP/s':>9s} {'of mm':>6s} "
                     f"{'MFU':>6s} {'peak MiB':>9s} {'CPU ms':>9s} {'first ms':>9s}")
        for name, r in m["results"].items():
            for tag in ("ours", "diffusers"):
                if f"rows_{tag}" not in r:
                    continue
                if f"error_{tag}" in r:
                    lines.append(f"{name:10s} {tag:9s} {r[f'rows_{tag}']:>6s} {r[f'error_{tag}']}")
                    continue
                mfu = f"{100 * r[f'mfu_{tag}']:5.1f}%" if f"mfu_{tag}" in r else "-"
                mem = f"{r[f'peak_mb_{tag}']:9.0f}" if f"peak_mb_{tag}" in r else "-"
                cpu = f"{r[f'{tag}_cpu_ms']:9.1f}" if f"{tag}_cpu_ms" in r else "-"
                lines.append(f"{name:10s} {tag:9s} {r[f'rows_{tag}']:>6s} {r[f'{tag}_ms']:10.1f} "
                             f"{r[f's_per_image_{tag}']:7.2f} {r[f'tflops_{tag}']:9.3f} {r[f'matmul_fraction_{tag}']:6.3f} "
                             f"{mfu:>6s} {mem:>9s} {cpu:>9s} {r[f'{tag}_first_ms']:9.0f}")
            if "ratio" in r:
                lines.append(f"{'':10s} ours/diffusers {r['ratio']:.3f}"
                             + (f" (CPU time {r['cpu_ratio']:.3f})" if "cpu_ratio" in r else "")
                             + f", max rel err {r['max_rel_err']:.2e}")
        o = m.get("dg_overhead", {})
        parts = [f"{impl} {o[impl]:.3f}x (FLOP model {o[f'flop_model_{impl}']:.3f}x"
                 + (f", CPU time {o[f'{impl}_cpu']:.3f}x" if f"{impl}_cpu" in o else "") + ")"
                 for impl in ("ours", "diffusers") if impl in o]
        if parts:
            lines.append("DG overhead (CFG+DG step / CFG step): " + ", ".join(parts))
    return "\n".join(lines)


def main(argv=None) -> int:
    """0, or 1 if a mode or an implementation failed (its error is in the results)."""
    args = parse(argv)
    if args.parallel:
        import parallel_latency

        out = parallel_latency.run(args)
        if out["results"]:  # rank 0
            print(parallel_latency.report(out), flush=True)
            if args.json:
                common.write_json(args.json, out)
        return 0
    shown = []

    def show(out, mode):  # each mode as soon as it is measured: a time limit keeps what finished
        print(report(out, [mode], header=not shown), flush=True)
        shown.append(mode)
        if args.json:
            common.write_json(args.json, out)

    out = run(args, show)
    failed = [mode for mode, m in out["modes"].items()
              if "error" in m or any(k.startswith("error_") for r in m["results"].values() for k in r)]
    return 1 if failed else 0


if __name__ == "__main__":
    common.run_main(main)
