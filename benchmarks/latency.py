"""Latency of one transformer step, ours vs diffusers, same weights, same inputs, one process.

    python benchmarks/latency.py --preset sd3.5-medium --num-layers 4 --resolution 384 \\
        --text-len 333 --dtype fp32 --iters 5 --json latency.json          # CPU
    python benchmarks/latency.py --preset flux.1-dev --resolution 1024 --dtype bf16     # GPU

Cases: one forward (batch B); one CFG step (2B rows); one CFG+DG step, ours as one call
forking the cond rows at block m, diffusers as 3B rows with a hook zeroing the MA channels at
block m. Calls are interleaved (the order alternates every iteration) after warm-up, CUDA is
synchronized around each call, and each time is the median (on CPU also the median process
CPU time, steadier than wall time on a machine shared with other jobs). Also printed: the DG overhead
(CFG+DG step / CFG step) of both, and on GPU the achieved TFLOP/s and MFU from a FLOP count.
"""
from __future__ import annotations

import argparse

import torch

import common


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_model_args(p)
    p.add_argument("--resolution", default="1024", help="image size in pixels, N or HxW (latent = /8)")
    p.add_argument("--batch", type=int, default=1, help="images per step (B)")
    p.add_argument("--fork-block", type=int, default=None, help="MA block m (default: total_blocks // 2)")
    p.add_argument("--cfg", type=float, default=4.5)
    p.add_argument("--dg", type=float, default=2.0)
    p.add_argument("--cases", default="forward,cfg,cfg_dg", help="comma-separated subset")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    return p.parse_args(argv)


def run(args) -> dict:
    config = common.config_from_args(args)
    device, dtype = torch.device(args.device), common.DTYPES[args.dtype]
    H, _, W = args.resolution.lower().partition("x")
    H, W = int(H), int(W or H)
    if H % 16 or W % 16:
        raise SystemExit(f"--resolution {args.resolution}: height and width must be multiples of 16")
    text_len = common.text_len(args, config)
    m = config.total_blocks // 2 if args.fork_block is None else args.fork_block

    peer = common.build_peer(config, device, dtype, args.seed)
    ours = common.ours_from_peer(peer, config)
    runner = common.PeerRunner(peer, config)
    if args.compile:
        ours, runner.peer = torch.compile(ours), torch.compile(peer)
    inp = common.make_inputs(config, args.batch, (H // 8, W // 8), text_len, device, dtype)
    cases = common.build_cases(ours, runner, config, inp, m, args.cfg, args.dg, args.cases.split(","))

    times = {c.name: {"ours": [], "diffusers": []} for c in cases}
    cpu_times = {c.name: {"ours": [], "diffusers": []} for c in cases}
    errors = {}
    with torch.inference_mode():
        for it in range(args.warmup + args.iters):
            for case in cases:
                pair = [("ours", case.ours), ("diffusers", case.peer)]
                outs = {}
                for impl, fn in pair if it % 2 == 0 else pair[::-1]:
                    t, cpu, outs[impl] = common.timed(fn, device)
                    if it >= args.warmup:
                        times[case.name][impl].append(t)
                        cpu_times[case.name][impl].append(cpu)
                if case.name not in errors:
                    errors[case.name] = common.rel_err(outs["ours"], outs["diffusers"])
                del outs

    dev_name = common.device_name(device)
    peak = common.peak_tflops(dev_name, dtype) if device.type == "cuda" else None
    results = {}
    for case in cases:
        t = times[case.name]
        ours_ms, peer_ms = common.median_ms(t["ours"]), common.median_ms(t["diffusers"])
        r = {"rows_ours": case.rows_ours, "rows_diffusers": case.rows_peer,
             "ours_ms": ours_ms, "diffusers_ms": peer_ms, "ratio": ours_ms / peer_ms,
             "ours_all_ms": [1e3 * s for s in t["ours"]], "diffusers_all_ms": [1e3 * s for s in t["diffusers"]],
             "flops_ours": case.flops_ours, "flops_diffusers": case.flops_peer,
             "tflops_ours": case.flops_ours / ours_ms / 1e9, "tflops_diffusers": case.flops_peer / peer_ms / 1e9,
             "max_rel_err": errors[case.name]}
        if device.type == "cpu":  # less sensitive than wall time to other jobs on a shared machine
            c = cpu_times[case.name]
            r["ours_cpu_ms"], r["diffusers_cpu_ms"] = common.median_ms(c["ours"]), common.median_ms(c["diffusers"])
            r["cpu_ratio"] = r["ours_cpu_ms"] / r["diffusers_cpu_ms"]
        if peak:
            r["mfu_ours"] = r["tflops_ours"] / peak
            r["mfu_diffusers"] = r["tflops_diffusers"] / peak
        results[case.name] = r
    out = {"benchmark": "latency", **common.environment(device), "preset": args.preset,
           "config": common.config_dict(config), "dtype": str(dtype).removeprefix("torch."),
           "resolution": [H, W], "batch": args.batch, "text_len": text_len, "image_tokens":
           common.tokens(config, (H // 8, W // 8)), "fork_block": m, "ma_channels": common.ma_channels(config),
           "cfg": args.cfg, "dg": args.dg, "warmup": args.warmup, "iters": args.iters,
           "compile": args.compile, "peak_tflops": peak, "results": results}
    if "cfg" in results and "cfg_dg" in results:
        out["dg_overhead"] = {
            "ours": results["cfg_dg"]["ours_ms"] / results["cfg"]["ours_ms"],
            "diffusers": results["cfg_dg"]["diffusers_ms"] / results["cfg"]["diffusers_ms"],
            "flop_model_ours": results["cfg_dg"]["flops_ours"] / results["cfg"]["flops_ours"],
            "flop_model_diffusers": results["cfg_dg"]["flops_diffusers"] / results["cfg"]["flops_diffusers"],
        }
        if device.type == "cpu":
            out["dg_overhead"]["ours_cpu"] = results["cfg_dg"]["ours_cpu_ms"] / results["cfg"]["ours_cpu_ms"]
            out["dg_overhead"]["diffusers_cpu"] = (results["cfg_dg"]["diffusers_cpu_ms"]
                                                   / results["cfg"]["diffusers_cpu_ms"])
    return out


def report(out: dict) -> str:
    lines = [common.describe_model(out) + f", "
             f"{out['resolution'][0]}x{out['resolution'][1]} ({out['image_tokens']} image + {out['text_len']} "
             f"text tokens), batch {out['batch']}, fork block {out['fork_block']}"
             f"{', torch.compile' if out['compile'] else ''}",
             f"device: {out['device']}; torch {out['torch']}, diffusers {out['diffusers']}; "
             f"median of {out['iters']} after {out['warmup']} warm-up, interleaved"]
    mfu = out["peak_tflops"] is not None
    cpu = "cpu_ratio" in next(iter(out["results"].values()))
    head = f"{'case':8s} {'rows ours/diff':>15s} {'ours ms':>10s} {'diffusers ms':>13s} {'ours/diff':>10s} " \
           f"{'TFLOP/s ours':>13s} {'diff':>7s}" + (f" {'MFU ours':>9s} {'diff':>6s}" if mfu else "") + \
           (f" {'CPU-time ratio':>15s}" if cpu else "") + f" {'max rel err':>12s}"
    lines.append(head)
    for name, r in out["results"].items():
        row = f"{name:8s} {r['rows_ours'] + ' / ' + r['rows_diffusers']:>15s} {r['ours_ms']:10.1f} " \
              f"{r['diffusers_ms']:13.1f} {r['ratio']:10.3f} {r['tflops_ours']:13.3f} {r['tflops_diffusers']:7.3f}"
        if mfu:
            row += f" {100 * r['mfu_ours']:8.1f}% {100 * r['mfu_diffusers']:5.1f}%"
        if cpu:
            row += f" {r['cpu_ratio']:15.3f}"
        lines.append(row + f" {r['max_rel_err']:12.2e}")
    if "dg_overhead" in out:
        o = out["dg_overhead"]
        lines.append(f"DG overhead (CFG+DG step / CFG step): ours {o['ours']:.3f}x "
                     f"(FLOP model {o['flop_model_ours']:.3f}x), diffusers {o['diffusers']:.3f}x "
                     f"(FLOP model {o['flop_model_diffusers']:.3f}x)"
                     + (f"; by CPU time: ours {o['ours_cpu']:.3f}x, diffusers {o['diffusers_cpu']:.3f}x"
                        if "ours_cpu" in o else ""))
    return "\n".join(lines)


def main(argv=None):
    args = parse(argv)
    out = run(args)
    print(report(out))
    if args.json:
        common.write_json(args.json, out)


if __name__ == "__main__":
    main()
