"""The first minute of a GPU run: do the fused kernels land inside the compiled graph, do CUDA
graphs replay the step, and is the step free of host syncs?

    python benchmarks/gpu_smoke.py --json smoke.json --code inductor_code.txt     # CUDA, bf16
    python benchmarks/gpu_smoke.py --device cpu --json smoke.json                 # a dry run

For one FLUX.1-dev model (one double and one single block) and one SD3.5-large model (two blocks),
full width on CUDA, a CFG+DG step (``samplers.guided_velocity``, the fork at block 0):

1. eager, once more under ``torch.cuda.set_sync_debug_mode("error")``: no host sync in the step;
2. inductor, ``compile="regional"`` (each block compiled in place): the code inductor generated
   (``torch._inductor.utils.run_and_get_code``) launches each fused kernel (norm_modulate,
   gated_residual, qk_norm_rope) itself, inside the graph, and makes no copy for them: inductor
   clones the arguments of a user Triton kernel it cannot prove safe to write in place, and such a
   copy shows as code whose source node is a ``triton_kernel_wrapper``; the output equals eager;
3. CUDA graphs: the blocks compiled with ``mode="reduce-overhead"``, three steps (recorded, then
   replayed), each equal to eager.

On a CPU (``--device cpu``, tiny widths) the same runs with the kernels as opaque custom ops in
Triton's interpreter (``torch.ops.mmdit.*`` in inductor's C++ wrapper), no sync mode, and step 3
replays the code of step 2 (no CUDA graph to record; a second compile would change nothing).
Exit status 1 if a check fails.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the kernels run in Triton's interpreter, chosen before triton.jit runs
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("MMDIT_KERNELS", "triton")

import torch._inductor.utils  # noqa: E402  (imports triton: after the interpreter is chosen)

import common  # noqa: E402  (puts the checkout on sys.path)
import mmdit  # noqa: E402
from mmdit.compiled import compile_regional  # noqa: E402
from mmdit.samplers import Guidance, guided_velocity  # noqa: E402

# the fused ops and the Triton kernel each launches in a forward
KERNELS = {"norm_modulate": "_norm_modulate_fwd_kernel", "gated_residual": "_gated_residual_fwd_kernel",
           "qk_norm_rope": "_qk_norm_rope_fwd_kernel"}
MODELS = {"flux.1-dev": dict(num_double=1, num_single=1), "sd3.5-large": dict(num_layers=2)}
TINY = {"flux.1-dev": dict(num_heads=2, head_dim=16, axes_dim=(4, 6, 6), context_dim=24, pooled_dim=20),
        "sd3.5-large": dict(num_heads=2, head_dim=16, context_dim=24, pooled_dim=20, pos_embed_max_size=16)}
REL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # compiled / graphed vs eager, max|a - b| / max|b|


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, default=None, help="latent side (default: 64, a 512px image, on CUDA; 8 elsewhere)")
    p.add_argument("--text-len", type=int, default=None, help="text tokens (default 128 on CUDA, 5 elsewhere)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--code", type=Path, default=None, help="write the code inductor generated here")
    return p.parse_args(argv)


def launches(code: str, op: str, cuda: bool) -> list[tuple[int, str]]:
    """(line number, line) of each launch of ``op``'s kernel in inductor's wrapper code."""
    pattern = rf"\b{KERNELS[op]}\w*\.run\(" if cuda else rf"torch\.ops\.mmdit\.{op}\.default\("
    return [(i, line) for i, line in enumerate(code.splitlines()) if re.search(pattern, line)]


def copies_for_kernels(code: str) -> list[str]:
    """Code that copies a tensor for a user Triton kernel: a line (or the comment naming its source
    nodes just above it) that clones or copies and comes from a ``triton_kernel_wrapper`` node."""
    lines, found = code.splitlines(), []
    for i, line in enumerate(lines):
        comment = lines[i - 1] if i and lines[i - 1].lstrip().startswith("#") else ""
        text = comment + line
        if "triton_kernel_wrapper" in text and re.search(r"clone|copy_|as_strided", text) \
                and not any(k in line for k in KERNELS.values()):
            found.append(line.strip())
    return found


def build(name: str, device, dtype, tiny: bool):
    config = mmdit.preset(name, **MODELS[name], **(TINY[name] if tiny else {}))
    model = common.build_ours(config, device, dtype)
    model.ma = mmdit.MASpec(channels=common.ma_channels(config), block=0)
    return model, config


def step_fn(model, config, size: int, text_len: int, device, dtype):
    """A CFG+DG step of ``model`` (one call: [uncond | cond] forked at block 0)."""
    inp = common.make_inputs(config, 2, (size, size), text_len, device, dtype)
    cond, uncond = {"context": inp.context[:1]}, {"context": inp.context[1:]}
    if inp.pooled is not None:
        cond["pooled"], uncond["pooled"] = inp.pooled[:1], inp.pooled[1:]
    guidance = 3.5 if getattr(config, "guidance_embed", False) else None
    rule = Guidance(cfg=4.5, dg=2.0)

    def step():
        return guided_velocity(model, inp.x[:1], 0.7, cond, uncond, rule, guidance)[0]
    return step


def check(name: str, args, device, dtype) -> tuple[dict, str]:
    """One family's checks -> (results, generated code)."""
    cuda = device.type == "cuda"
    size, text_len = args.size or (64 if cuda else 8), args.text_len or (128 if cuda else 5)
    model, config = build(name, device, dtype, tiny=not cuda)
    step = step_fn(model, config, size, text_len, device, dtype)
    out = {"blocks": config.total_blocks, "hidden": config.hidden_size, "latent": [size, size], "text_len": text_len}
    with torch.inference_mode():
        eager = step().clone()  # the first call compiles the eager Triton kernels
        common.synchronize(device)
        if cuda:
            torch.cuda.set_sync_debug_mode("error")
        try:
            step()
            out["sync_free"] = True
        except RuntimeError as e:  # the sync mode raises where the step waits for the host
            out["sync_free"], out["sync_error"] = False, str(e).splitlines()[0]
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")

        torch._dynamo.reset()
        compile_regional(model, backend="inductor")
        t0 = time.perf_counter()
        compiled, code = torch._inductor.utils.run_and_get_code(step)
        common.synchronize(device)
        code = "\n".join(code)
        found = {op: len(launches(code, op, cuda)) for op in KERNELS}
        copies = copies_for_kernels(code)
        out["inductor"] = {"compile_s": round(time.perf_counter() - t0, 2), "graphs": code.count("def call("),
                           "kernel_launches": found, "copies_for_kernels": copies,
                           "rel_err_vs_eager": common.rel_err(compiled, eager)}
        out["inductor"]["ok"] = (all(found.values()) and not copies
                                 and out["inductor"]["rel_err_vs_eager"] <= REL[dtype])

        if cuda:  # a CPU has no CUDA graph to record: the code compiled above runs the steps below
            torch._dynamo.reset()
            compile_regional(model, backend="inductor", mode="reduce-overhead")
        t0, errors, times = time.perf_counter(), [], []
        for i in range(3 if cuda else 2):  # record, then replay (a CPU has nothing to record)
            torch.compiler.cudagraph_mark_step_begin()
            t, _, graphed = common.timed(step, device)
            errors.append(common.rel_err(graphed, eager))
            times.append(t)
            if i == 0:
                first = time.perf_counter() - t0
        out["cudagraphs"] = {"first_step_s": round(first, 2), "replay_ms": round(1e3 * statistics.median(times[1:]), 3),
                             "rel_err_vs_eager": max(errors), "ok": max(errors) <= REL[dtype]}
    torch._dynamo.reset()
    out["ok"] = out["sync_free"] and out["inductor"]["ok"] and out["cudagraphs"]["ok"]
    return out, code


def report(name: str, r: dict) -> str:
    i, g = r["inductor"], r["cudagraphs"]
    kernels = ", ".join(f"{op} x{n}" for op, n in i["kernel_launches"].items())
    return (f"{name} ({r['blocks']} blocks, hidden {r['hidden']}): {'ok' if r['ok'] else 'FAILED'}\n"
            f"  no host sync in the eager CFG+DG step: {r['sync_free']}" + (f" ({r['sync_error']})" if not r['sync_free'] else "") +
            f"\n  inductor: compiled in {i['compile_s']} s, {i['graphs']} graphs; kernels launched: {kernels}; "
            f"copies made for them: {len(i['copies_for_kernels'])}; vs eager {i['rel_err_vs_eager']:.1e}"
            f"\n  CUDA graphs (reduce-overhead): first step {g['first_step_s']} s, replay {g['replay_ms']} ms, "
            f"vs eager {g['rel_err_vs_eager']:.1e}")


def main(argv=None) -> int:
    args = parse(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = {"benchmark": "gpu_smoke", **common.environment(device), "dtype": str(dtype).removeprefix("torch."),
           "kernels": os.environ.get("MMDIT_KERNELS", "auto"), "families": {}}
    codes = []
    for name in MODELS:
        try:
            out["families"][name], code = check(name, args, device, dtype)
            codes.append(f"# ==== {name} ====\n{code}")
            print(report(name, out["families"][name]), flush=True)
        except Exception as e:  # noqa: BLE001  one family's failure must not hide the other's result
            traceback.print_exc()
            out["families"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            print(f"{name}: FAILED: {type(e).__name__}: {e}", flush=True)
        if args.json:
            common.write_json(args.json, out)
    if args.code:
        with common.atomic(args.code) as tmp:
            tmp.write_text("\n".join(codes))
    return 0 if all(r["ok"] for r in out["families"].values()) else 1


if __name__ == "__main__":
    common.run_main(main)
