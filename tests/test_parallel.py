"""Generation over several processes (gloo on the CPU, processes spawned here): branch and
sequence parallel sample the same latents as one process; many images over ranks write the
same PNG bytes as one process (the shipped tiny model, under torchrun)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mmdit
from mmdit import distributed as parallel
from mmdit.distributed.branch import plan
from mmdit.branches import Branch, SkipLayers
from mmdit.cli import main
from mmdit.samplers import Guidance, sample, sd3_sigmas
from mmdit.distributed.group import split_sizes
from mmdit.distributed.sequence import SequenceParallel
from helpers import tiny

pytestmark = pytest.mark.slow  # compiles, several processes or subprocesses

LATENT_TOL = 1e-5  # fp32, relative to the latents' scale: the same rows, computed in other batches
STEPS = 3
# (name, family, mode, guidance terms); the text has 7 tokens and the image 30: uneven over ranks
CASES = {
    2: [("sd3 branch cfg+dg", "sd3", "branch", dict(cfg=4.0, dg=2.0)),
        ("flux branch cfg+dg", "flux", "branch", dict(cfg=4.0, dg=2.0)),
        ("sd3 branch dg", "sd3", "branch", dict(dg=2.0)),
        ("sd3 branch cfg+dg+slg", "sd3", "branch", dict(cfg=4.0, dg=2.0, slg=1.5, slg_layers=(2,))),
        ("sd3 sequence cfg+dg", "sd3", "sequence", dict(cfg=4.0, dg=2.0)),
        ("flux sequence cfg+dg", "flux", "sequence", dict(cfg=4.0, dg=2.0)),
        ("qwen branch cfg+dg", "qwen-image", "branch", dict(cfg=4.0, dg=2.0)),
        ("qwen sequence cfg+dg", "qwen-image", "sequence", dict(cfg=4.0, dg=2.0))],
    3: [("sd3 branch cfg+dg", "sd3", "branch", dict(cfg=4.0, dg=2.0)),
        ("flux branch cfg+dg", "flux", "branch", dict(cfg=4.0, dg=2.0))],
    4: [("sd3 branch+sequence cfg+dg", "sd3", "branch+sequence", dict(cfg=4.0, dg=2.0)),
        ("flux branch+sequence cfg+dg", "flux", "branch+sequence", dict(cfg=4.0, dg=2.0))],
}
PADDED = {"qwen branch cfg+dg"}  # prompts of 5 and 3 tokens padded to 7, with their mask
# 4 processes take ~30 s on 2 shared cores: run with MMDIT_TEST_4_RANKS=1 (measured: <= 5.5e-7)
SIZES = [2, 3] + ([4] if os.environ.get("MMDIT_TEST_4_RANKS") == "1" else [])


def run_case(family: str, mode: str | None, terms: dict, padded: bool = False) -> torch.Tensor:
    """A few CFG / DG steps of one image (12x10 latents, 7 text tokens) with the model in ``mode``;
    ``padded``: Qwen-Image's cond / uncond prompts are 5 / 3 tokens and a context_mask."""
    model = tiny(family)
    model.ma = mmdit.MASpec(channels=(3, 17, 30), block=1)
    g = torch.Generator().manual_seed(5)
    cfg = model.config
    cond, uncond = ({"context": torch.randn(1, 7, cfg.context_dim, generator=g),
                     "pooled": torch.randn(1, getattr(cfg, "pooled_dim", 0), generator=g)} for _ in range(2))
    if family == "qwen-image":  # no pooled input
        for c, n in ((cond, 5), (uncond, 3)):
            del c["pooled"]
            if padded:
                c["context_mask"] = (torch.arange(7) < n).float()[None]
    noise = torch.randn(1, 16, 12, 10, generator=g)
    flux = dict(guidance=3.5) if family == "flux" else {}
    denoiser = parallel.wrap(model, mode)
    return sample(denoiser, noise, sd3_sigmas(STEPS), cond, uncond if "cfg" in terms else None,
                  guide=Guidance(**terms), **flux)


def worker(rank: int, size: int, folder: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=size)
    try:
        out = {name: run_case(family, mode, terms, name in PADDED) for name, family, mode, terms in CASES[size]}
        torch.save(out, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("size", SIZES)
def test_branch_and_sequence_parallel_equal_one_process(tmp_path, size):
    mp.spawn(worker, args=(size, str(tmp_path)), nprocs=size, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(size)]
    for name, family, _, terms in CASES[size]:
        expected = run_case(family, None, terms, name in PADDED)
        scale = expected.abs().max().item()
        for r in range(size):
            err = (ranks[r][name] - expected).abs().max().item() / scale
            assert err <= LATENT_TOL, f"{name}, rank {r} of {size}: off by {err:.2e} of the latents' scale"


def test_branch_plan_keeps_the_fork_with_the_cond_rows():
    """Rows [uncond | cond] (B = 2), the fork's copies after them: who computes what."""
    fork = slice(2, 4)
    two = plan(4, fork, (), 2)
    assert [(j.rows, j.fork, j.disrupt, j.pieces) for j in two] == [
        (slice(0, 2), False, False, ((0, 2),)), (slice(2, 4), True, False, ((2, 2), (4, 2)))]
    three = plan(4, fork, (), 3)  # balanced: uncond | cond | the DG branch alone
    assert [(j.rows, j.fork, j.disrupt, j.pieces) for j in three] == [
        (slice(0, 2), False, False, ((0, 2),)), (slice(2, 4), False, False, ((2, 2),)),
        (slice(2, 4), False, True, ((4, 2),))]
    slg = (Branch(fork, SkipLayers((1,))),)
    cond = plan(4, fork, slg, 3)[1]  # SLG's copies stay with the cond rows, after the fork's place
    assert cond.branches == (Branch(slice(0, 2), SkipLayers((1,))),) and cond.pieces == ((2, 2), (6, 2))
    assert [j.pieces for j in plan(2, None, (), 3)] == [((0, 1),), ((1, 1),)]  # CFG only: rank 2 waits


def test_sequence_parallel_needs_heads_divisible_by_ranks():
    model = tiny("sd3")  # 2 heads
    with pytest.raises(ValueError, match="2 attention heads: 2 is not a multiple of 3"):
        SequenceParallel(model, model, 0, 3)
    assert split_sizes(7, 2) == (4, 3) and split_sizes(30, 3) == (10, 10, 10)


def test_without_a_process_group_nothing_changes():
    model = tiny("sd3")
    assert parallel.wrap(model, "branch") is model and parallel.wrap(model, "sequence") is model
    with pytest.raises(ValueError, match="parallel='ring'"):
        parallel.wrap(model, "ring")


# --- many images: `mmdit generate --prompts FILE --outdir DIR` ------------------------------

LINES = ["a red circle on a blue background", "", "a black square on a yellow background",
         "a green triangle on a white background"]  # the blank line keeps its index (and seed)
ROOT = Path(__file__).resolve().parents[1]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 -m mmdit ...`` from the checkout (its mmdit), gloo on the CPU."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--standalone", "-m", "mmdit", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_prompts_file_over_two_ranks_writes_the_one_process_bytes(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(LINES) + "\n")
    common = ["generate", "--prompts", str(prompts), "--steps", "3", "--seed", "10"]
    assert main([*common, "--outdir", str(tmp_path / "one")]) == 0
    names = sorted(p.name for p in (tmp_path / "one").glob("*.png"))
    assert names == ["00000.png", "00002.png", "00003.png"]
    settings = json.loads(__import__("PIL.Image").Image.open(tmp_path / "one" / "00003.png").text["mmdit"])
    assert settings["prompt"] == LINES[3] and settings["seed"] == 13

    run = torchrun(*common, "--outdir", str(tmp_path / "two"))
    assert run.returncode == 0, run.stderr
    for name in names:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    progress = re.findall(r"rank (\d)/2: image (\d)/(\d): wrote", run.stderr)  # lines 0, 3 on rank 0; 2 on rank 1
    assert sorted(progress) == [("0", "1", "2"), ("0", "2", "2"), ("1", "1", "1")]


def test_prompts_file_resumes_and_checks_its_arguments(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(LINES) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "00002.png").write_bytes(b"kept")  # done before the run stopped
    assert main(["generate", "--prompts", str(prompts), "--steps", "2", "--outdir", str(out)]) == 0
    assert (out / "00002.png").read_bytes() == b"kept"
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00002.png", "00003.png"]  # no .part left
    assert "image 2/2: wrote" in capsys.readouterr().err
    for bad in (["--prompts", str(prompts)], ["--prompt", "a", "--prompts", str(prompts), "--outdir", str(out)],
                ["--prompt", "a", "--outdir", str(out)], ["--prompts", str(tmp_path / "none.txt"), "--outdir", "x"]):
        assert main(["generate", *bad]) == 2


def test_branch_parallel_cli_under_torchrun_matches_one_process(tmp_path):
    """--parallel branch, CFG + DG on the shipped model: the same image to the last 8-bit level
    (the latents agree to 1e-5; a value on a rounding edge may land one level off)."""
    common = ["generate", "--prompt", LINES[0], "--steps", "3", "--dg", "2"]
    assert main([*common, "--output", str(tmp_path / "one.png")]) == 0
    run = torchrun(*common, "--parallel", "branch", "--output", str(tmp_path / "two.png"))
    assert run.returncode == 0, run.stderr
    import numpy as np
    from PIL import Image

    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.int16) for n in ("one", "two"))
    assert np.abs(a - b).max() <= 1


def test_latency_benchmark_over_two_ranks(tmp_path):
    """``benchmarks/latency.py --parallel`` under torchrun: both cases timed, the collectives'
    share measured, the parallel velocity equal to one rank's (fp32)."""
    path = tmp_path / "parallel.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "benchmarks/latency.py", "--parallel", "sequence", "--preset", "flux.1-dev",
                          "--num-layers", "3", "--set", "axes_dim=(4,6,6)", "--set", "num_heads=2", "--set",
                          "head_dim=16", "--set", "context_dim=24", "--set", "pooled_dim=20", "--device", "cpu",
                          "--resolution", "64", "--text-len", "5", "--warmup", "0", "--iters", "1",
                          "--json", str(path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = json.loads(path.read_text())
    assert out["ranks"] == 2 and sorted(out["results"]) == ["cfg", "cfg_dg"]
    for r in out["results"].values():
        assert r["one_rank_ms"] > 0 and r["parallel_ms"] > 0 and 0 < r["comm_share"] < 1
        assert r["max_rel_err"] <= LATENT_TOL
