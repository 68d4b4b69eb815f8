"""Step latency over several ranks (``latency.py --parallel branch|sequence``, under torchrun).

    torchrun --nproc-per-node 2 benchmarks/latency.py --parallel branch --preset flux.1-dev --dtype bf16
    torchrun --nproc-per-node 2 benchmarks/latency.py --parallel sequence --preset sd3.5-medium \\
        --num-layers 4 --set num_heads=4 --set head_dim=32 --resolution 256 --device cpu --iters 5   # CPU

Every rank builds the same random-weight model (same seed). Per case (a CFG step, a CFG+DG
step: one ``guided_velocity`` call each): the step on one rank alone (rank 0, while the others
wait: on a shared CPU they would compete for its cores), then the step with every rank in
``--parallel`` mode. Reported: both medians, the speed-up, the share of the parallel step spent
in collectives (a second pass with the device synchronized around each collective: the
all-gather of branch parallel, the all-to-alls and the gather of sequence parallel) and the
largest difference of the parallel velocity from the one-rank velocity.
"""
from __future__ import annotations

import statistics

import torch

import common
import mmdit
from mmdit import distributed as parallel
from mmdit.samplers.guidance import Guidance, guided_velocity

GUIDANCE = {"cfg": lambda a: Guidance(cfg=a.cfg), "cfg_dg": lambda a: Guidance(cfg=a.cfg, dg=a.dg)}


def run(args) -> dict:
    rank, size = parallel.init(args.device)
    try:
        return measure(args, rank, size)
    finally:  # leave the group before exiting: gloo's threads, torn down at interpreter exit, can abort
        parallel.close()


def measure(args, rank: int, size: int) -> dict:
    device, dtype = torch.device(parallel.local_device(args.device)), common.DTYPES[args.dtype]
    config = common.config_from_args(args)
    H, _, W = args.resolution.lower().partition("x")
    h, w = int(H) // 8, int(W or H) // 8
    torch.manual_seed(args.seed)
    model = mmdit.build_transformer(config, device=device, dtype=dtype).eval()
    m = config.total_blocks // 2 if args.fork_block is None else args.fork_block
    model.ma = mmdit.MASpec(channels=common.ma_channels(config), block=m)
    n_txt = common.text_len(args, config)
    inp = common.make_inputs(config, args.batch, (h, w), n_txt, device, dtype, seed=args.seed + 1)
    cond = {"context": inp.context, "pooled": inp.pooled}
    uncond = {"context": -inp.context, "pooled": -inp.pooled}
    g = inp.guidance
    wrapped = parallel.wrap(model, args.parallel)
    out = {"benchmark": "latency_parallel", **common.environment(device), "parallel": args.parallel, "ranks": size,
           "preset": args.preset, "config": common.config_dict(config), "dtype": args.dtype,
           "resolution": [8 * h, 8 * w], "image_tokens": common.tokens(config, (h, w)), "text_len": n_txt,
           "batch": args.batch, "fork_block": m, "iters": args.iters, "warmup": args.warmup, "results": {}}
    import torch.distributed as dist

    with torch.inference_mode():
        for name in args.cases.split(","):
            if name not in GUIDANCE:
                raise SystemExit(f"--cases {name}: with --parallel choose from {sorted(GUIDANCE)}")
            rule = GUIDANCE[name](args)

            def step(fn):
                return guided_velocity(fn, inp.x, 0.7, cond, uncond, rule, g)[0]

            alone, reference = [], None
            if rank == 0:
                for it in range(args.warmup + args.iters):
                    t, _, reference = common.timed(lambda: step(model), device)
                    alone += [t] if it >= args.warmup else []
            dist.barrier()
            together, comm_share, v = [], [], None
            for it in range(args.warmup + args.iters):
                dist.barrier()
                t, _, v = common.timed(lambda: step(wrapped), device)
                together += [t] if it >= args.warmup else []
            wrapped.comm.on = True
            for _ in range(args.iters):  # the collectives' share, the device synchronized around each
                dist.barrier()
                wrapped.comm.seconds = 0.0
                t, _, _ = common.timed(lambda: step(wrapped), device)
                comm_share.append(wrapped.comm.seconds / t)
            wrapped.comm.on = False
            slowest = torch.tensor([statistics.median(together)], device=device)  # NCCL: a GPU tensor
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # the step ends when the last rank has its share
            if rank == 0:
                one, par = 1e3 * statistics.median(alone), 1e3 * slowest.item()
                out["results"][name] = {"one_rank_ms": one, "parallel_ms": par, "speedup": one / par,
                                        "comm_share": statistics.median(comm_share),
                                        "max_rel_err": common.rel_err(v, reference)}
    return out


def report(out: dict) -> str:
    lines = [common.describe_model(out) + f", {out['resolution'][0]}x{out['resolution'][1]} "
             f"({out['image_tokens']} image + {out['text_len']} text tokens), batch {out['batch']}, "
             f"fork block {out['fork_block']}",
             f"--parallel {out['parallel']} over {out['ranks']} ranks; device: {out['device']}; torch {out['torch']}; "
             f"median of {out['iters']} after {out['warmup']} warm-up",
             f"{'case':8s} {'one rank ms':>12s} {'parallel ms':>12s} {'speed-up':>9s} {'comm share':>11s} "
             f"{'max rel err':>12s}"]
    for name, r in out["results"].items():
        lines.append(f"{name:8s} {r['one_rank_ms']:12.1f} {r['parallel_ms']:12.1f} {r['speedup']:8.2f}x "
                     f"{100 * r['comm_share']:10.1f}% {r['max_rel_err']:12.2e}")
    return "\n".join(lines)
