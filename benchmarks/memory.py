"""Memory: loading a checkpoint (peak host RSS, wall time), ours vs diffusers; on GPU also the
peak allocated memory of one step.

    python benchmarks/memory.py --preset sd3.5-medium --num-layers 4 --dtype fp32 --json memory.json

It first saves a random diffusers checkpoint of the config (``save_pretrained``; in --dir, or a
temporary folder), then loads it --repeats times each way, alternating, every load in a fresh
subprocess: ours with ``mmdit.load_transformer(folder)``, diffusers with
the saved ``_class_name``'s ``from_pretrained(folder)`` (``FluxTransformer2DModel``, ...). After loading, each
child reads every weight once (a sum), so lazily mapped weights count as resident for both.
Reported (medians): peak RSS of the child (VmHWM), the part of it above the RSS right
after imports (what loading added), and the load time. On CUDA, loads go to the GPU and the
steps of ``latency.py`` (forward, CFG, CFG+DG) are measured for peak allocated GPU memory.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import common


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_model_args(p)
    p.add_argument("--dir", type=Path, default=None, help="where to save the checkpoint (default: a temp dir)")
    p.add_argument("--repeats", type=int, default=3, help="loads per implementation (fresh process each)")
    p.add_argument("--resolution", type=int, default=1024, help="image size for the GPU step memory")
    p.add_argument("--no-steps", action="store_true", help="skip the GPU step memory")
    p.add_argument("--child", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    p.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- one load, in a fresh process ----------------------------------------------------------

def _status_mb(field: str) -> float | None:
    """A field of /proc/self/status (VmRSS, VmHWM) in MiB; None without /proc (not Linux)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return None


def _rss_mb() -> float:
    rss = _status_mb("VmRSS")
    return float("nan") if rss is None else rss


def _peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a
    child would report its parent's peak at fork time."""
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB


def child(args) -> dict:
    """Load ``args.path`` one way and return the measurements (runs in its own process)."""
    device, dtype = torch.device(args.device), common.DTYPES[args.dtype]
    if args.child == "diffusers":
        import diffusers
        from diffusers.utils import logging
        logging.set_verbosity_error()
        cls = getattr(diffusers, json.loads((args.path / "config.json").read_text())["_class_name"])  # as saved
        from diffusers.utils import is_accelerate_available
        mode = {"low_cpu_mem_usage": is_accelerate_available()}  # diffusers' default: meta init needs accelerate

        def load():
            return cls.from_pretrained(args.path, torch_dtype=dtype).to(device)
    else:
        load_transformer = common.mmdit.load_transformer  # imported before the baseline, like diffusers
        mode = {}

        def load():
            return load_transformer(args.path, dtype=dtype, device=device)
    import_rss = _rss_mb()
    t0 = time.perf_counter()
    model = load()
    common.synchronize(device)
    t1 = time.perf_counter()
    with torch.no_grad():  # every weight read once: mmapped tensors become resident
        total = sum(float(t.float().sum()) for t in model.state_dict().values())
    common.synchronize(device)
    t2 = time.perf_counter()
    out = {"import_rss_mb": import_rss, "peak_rss_mb": _peak_rss_mb(), "load_s": t1 - t0, "touch_s": t2 - t1,
           "params": sum(p.numel() for p in model.parameters()), "checksum": total, **mode}
    out["load_rss_mb"] = out["peak_rss_mb"] - import_rss
    if device.type == "cuda":
        out["gpu_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def load_in_subprocess(impl: str, path: Path, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", impl, "--path", str(path),
           "--dtype", args.dtype, "--device", args.device, "--preset", args.preset]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode:
        raise RuntimeError(f"{impl} load failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- GPU memory of one step ----------------------------------------------------------------

def step_memory(config, args) -> dict:
    device, dtype = torch.device(args.device), common.DTYPES[args.dtype]
    peer = common.build_peer(config, device, dtype, args.seed)
    ours = common.ours_from_peer(peer, config)
    runner = common.PeerRunner(peer, config)
    text_len = common.text_len(args, config)
    latent = args.resolution // 8
    inp = common.make_inputs(config, 1, (latent, latent), text_len, device, dtype)
    cases = common.build_cases(ours, runner, config, inp, config.total_blocks // 2)
    out = {}
    with torch.inference_mode():
        for case in cases:
            r = {}
            for impl, fn in (("ours", case.ours), ("diffusers", case.peer)):
                fn()  # warm-up (allocator, kernels)
                common.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                fn()
                common.synchronize(device)
                r[f"{impl}_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
            r["ratio"] = r["ours_mb"] / r["diffusers_mb"]
            out[case.name] = r
    return out


# ---- the parent ----------------------------------------------------------------------------

def save_checkpoint(config, args, folder: Path) -> int:
    """A random diffusers checkpoint of ``config`` (built on --device: faster init on a GPU)."""
    peer = common.build_peer(config, args.device, common.DTYPES[args.dtype], args.seed)
    peer.save_pretrained(folder, safe_serialization=True)
    del peer
    if torch.device(args.device).type == "cuda":
        torch.cuda.empty_cache()  # the children load onto the same GPU
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def run(args) -> dict:
    config = common.config_from_args(args)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp) / "transformer"
        size = save_checkpoint(config, args, folder)
        loads = {"ours": [], "diffusers": []}
        for i in range(args.repeats):
            for impl in ("ours", "diffusers") if i % 2 == 0 else ("diffusers", "ours"):
                loads[impl].append(load_in_subprocess(impl, folder, args))
    summary = {}
    for impl, runs in loads.items():
        summary[impl] = {k: statistics.median(r[k] for r in runs)
                         for k in runs[0] if isinstance(runs[0][k], float)}
        summary[impl]["params"] = runs[0]["params"]
        if "low_cpu_mem_usage" in runs[0]:
            summary[impl]["low_cpu_mem_usage"] = runs[0]["low_cpu_mem_usage"]
        summary[impl]["runs"] = runs
    ratios = {k: summary["ours"][k] / summary["diffusers"][k]
              for k in ("peak_rss_mb", "load_rss_mb", "load_s", "gpu_peak_allocated_mb") if k in summary["ours"]}
    device = torch.device(args.device)
    out = {"benchmark": "memory", **common.environment(device), "preset": args.preset,
           "config": common.config_dict(config), "dtype": args.dtype, "checkpoint_mb": size / 2**20,
           "repeats": args.repeats, "load": summary, "ratio": ratios}
    if device.type == "cuda" and not args.no_steps:
        out["step_gpu_mb"] = step_memory(config, args)
    return out


def report(out: dict) -> str:
    lines = [common.describe_model(out) + f" checkpoint "
             f"of {out['checkpoint_mb']:.0f} MiB; device: {out['device']}; torch {out['torch']}, "
             f"diffusers {out['diffusers']}; median of {out['repeats']} fresh-process loads each",
             f"{'':10s} {'peak RSS MiB':>13s} {'after imports':>14s} {'added by load':>14s} {'load s':>8s}"]
    for impl in ("ours", "diffusers"):
        s = out["load"][impl]
        note = ""
        if "low_cpu_mem_usage" in s:  # without accelerate, diffusers initialises the model, then copies
            note = f"  (low_cpu_mem_usage={s['low_cpu_mem_usage']}: accelerate " \
                   f"{'installed' if s['low_cpu_mem_usage'] else 'not installed'})"
        lines.append(f"{impl:10s} {s['peak_rss_mb']:13.0f} {s['import_rss_mb']:14.0f} {s['load_rss_mb']:14.0f} "
                     f"{s['load_s']:8.2f}" + (f"  GPU peak {s['gpu_peak_allocated_mb']:.0f} MiB"
                                              if "gpu_peak_allocated_mb" in s else "") + note)
    r = out["ratio"]
    lines.append(f"{'ours/diff':10s} {r['peak_rss_mb']:13.3f} {'':14s} {r['load_rss_mb']:14.3f} {r['load_s']:8.3f}"
                 + (f"  GPU peak {r['gpu_peak_allocated_mb']:.3f}" if "gpu_peak_allocated_mb" in r else ""))
    for name, s in out.get("step_gpu_mb", {}).items():
        lines.append(f"step {name:8s} peak allocated: ours {s['ours_mb']:.0f} MiB, diffusers "
                     f"{s['diffusers_mb']:.0f} MiB, ratio {s['ratio']:.3f}")
    return "\n".join(lines)


def main(argv=None):
    args = parse(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    out = run(args)
    print(report(out))
    if args.json:
        common.write_json(args.json, out)


if __name__ == "__main__":
    common.run_main(main)
