"""Smoke tests of benchmarks/latency.py, memory.py and kernel_speed.py on tiny configs.

They check that the scripts run end to end (diffusers peer with our weights, the DG hook,
the fork, fresh-process loads) and that the JSON has its fields; not the timings.
"""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.append(str(BENCH))  # appended: nothing in benchmarks/ may shadow an installed module

import common  # noqa: E402
import kernel_speed  # noqa: E402
import latency  # noqa: E402
import memory  # noqa: E402

pytestmark = pytest.mark.slow  # compiles, several processes or subprocesses

TINY = {
    "sd3": ["--preset", "sd3.5-medium", "--num-layers", "2", "--set", "pos_embed_max_size=16",
            "--set", "dual_attention_layers=(0,)", "--set", "pooled_dim=20"],
    "flux": ["--preset", "flux.1-dev", "--num-layers", "3", "--set", "axes_dim=(4,6,6)", "--set", "pooled_dim=20"],
    "flux2": ["--preset", "flux.2-dev", "--num-layers", "3"],  # head_dim 16: axes (4, 4, 4, 4); no pooled input
    "qwen": ["--preset", "qwen-image", "--num-layers", "2", "--set", "axes_dim=(8,4,4)"],
    "chroma": ["--preset", "chroma", "--num-layers", "3", "--set", "axes_dim=(4,6,6)", "--set", "approximator_in=16",
               "--set", "approximator_hidden=32", "--set", "approximator_layers=2"],
}
SMALL = ["--set", "num_heads=2", "--set", "head_dim=16", "--set", "context_dim=24",
         "--device", "cpu", "--dtype", "fp32"]
CASE_FIELDS = {"ours_ms", "diffusers_ms", "ratio", "ours_all_ms", "diffusers_all_ms", "flops_ours",
               "flops_diffusers", "tflops_ours", "tflops_diffusers", "max_rel_err", "rows_ours", "rows_diffusers",
               "s_per_image_ours", "s_per_image_diffusers", "matmul_fraction_ours"}


@pytest.mark.parametrize("family", ["sd3", "flux", "flux2", "qwen", "chroma"])
def test_latency_script_writes_every_field_and_matches_diffusers(family, tmp_path, capsys):
    path = tmp_path / "latency.json"
    cases = ["forward", "cfg", "cfg_dg"] + (["cfg_slg", "cfg_dg_slg"] if family == "sd3" else [])
    modes = ["eager", "compiled"] if family == "sd3" else ["eager"]  # the compiled path is the same for all
    latency.main(TINY[family] + SMALL + ["--resolution", "128x96", "--text-len", "5", "--warmup", "0",
                                         "--iters", "2", "--modes", ",".join(modes), "--backend", "aot_eager",
                                         "--cases", ",".join(cases), "--json", str(path)])
    out = json.loads(path.read_text())
    for key in ("device", "torch", "diffusers", "date", "config", "dtype", "resolution", "batch", "text_len",
                "fork_block", "ma_channels", "modes", "peak_tflops", "matmul_tflops", "steps"):
        assert key in out, key
    assert out["fork_block"] == 1  # total_blocks // 2; FLUX / FLUX.2 1+2 blocks: single block 0; Qwen-Image 2 blocks
    assert out["matmul_tflops"] > 0
    assert list(out["modes"]) == modes
    for mode in out["modes"].values():
        assert set(mode["results"]) == set(cases)
        for name, r in mode["results"].items():
            assert CASE_FIELDS <= set(r), (name, CASE_FIELDS - set(r))
            assert len(r["ours_all_ms"]) == len(r["diffusers_all_ms"]) == 2
            assert r["max_rel_err"] < 1e-4, (name, r["max_rel_err"])  # same weights, same guidance
            assert {"ours_cpu_ms", "diffusers_cpu_ms", "cpu_ratio"} <= set(r)  # CPU runs add process CPU time
            assert r["s_per_image_ours"] == pytest.approx(r["ours_ms"] * 28 / 1e3)
        assert mode["results"]["cfg_dg"]["rows_ours"] == "2->3" and mode["results"]["cfg_dg"]["rows_diffusers"] == "3"
        if family == "sd3":  # SLG: one call with a skip branch vs diffusers' extra pass with skip_layers
            assert mode["results"]["cfg_dg_slg"]["rows_ours"] == "2->4"
            assert mode["results"]["cfg_dg_slg"]["rows_diffusers"] == "3+1"
        o = mode["dg_overhead"]
        assert o["flop_model_diffusers"] == pytest.approx(1.5, rel=1e-6)
        assert 1.0 < o["flop_model_ours"] < 1.5
    printed = capsys.readouterr().out
    assert "DG overhead" in printed and ("-- compiled --" in printed) == ("compiled" in modes)


def test_forward_flops_match_hand_count():
    import common
    import mmdit
    cfg = mmdit.preset("sd3-medium", num_layers=1, num_heads=1, head_dim=4, context_dim=3, pooled_dim=2)
    D, F, N, T = 4, 16, 6, 5
    head = N * 16 * 4 * D + T * 3 * D + 256 * D + D * D + 2 * D + D * D
    block = 6 * D * D + N * (4 * D * D + 2 * D * F) + 2 * D * D + T * 3 * D * D  # last block: pre_only ctx
    final = 2 * D * D + N * D * 64
    want = 2 * (head + block + final) + 4 * (N + T) ** 2 * D
    assert common.forward_flops(cfg, N, T, 1) == want
    assert common.forward_flops(cfg, N, T, 2) == 2 * want


def test_flux2_flops_match_torch_flop_counter():
    """Every matmul of a FLUX.2 forward as torch's FlopCounterMode counts it (CPU SDPA is not
    counted there: its 4 (N + T)^2 D per block and row is added), plain and with a DG fork."""
    import mmdit
    from torch.utils.flop_counter import FlopCounterMode

    cfg = mmdit.preset("flux.2-dev", num_double=2, num_single=3, num_heads=2, head_dim=16, context_dim=24)
    model = mmdit.build_transformer(cfg).eval()
    model.ma = mmdit.MASpec((1, 2), block=2)
    N, T, D = 4 * 3, 5, cfg.hidden_size
    x, ctx = torch.randn(2, 128, 4, 3), torch.randn(2, T, 24)
    for fork, block_rows in ((None, 2 * 5), (slice(1, 2), 2 * 5 + 2)):  # the fork adds a row to blocks 3 and 4
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x, torch.rand(2), ctx, guidance=3.0, fork=fork)
        sdpa = block_rows * 4 * (N + T) ** 2 * D
        want = common.forward_flops(cfg, N, T, 2, None if fork is None else 2, 0 if fork is None else 1)
        assert counter.get_total_flops() + sdpa == want


def test_memory_script_loads_both_ways_in_fresh_processes(tmp_path, capsys):
    path = tmp_path / "memory.json"
    memory.main(TINY["sd3"] + SMALL + ["--repeats", "1", "--dir", str(tmp_path), "--json", str(path)])
    out = json.loads(path.read_text())
    for key in ("device", "torch", "diffusers", "date", "config", "checkpoint_mb", "load", "ratio"):
        assert key in out, key
    for impl in ("ours", "diffusers"):
        s = out["load"][impl]
        assert {"peak_rss_mb", "import_rss_mb", "load_rss_mb", "load_s", "params"} <= set(s)
        assert s["peak_rss_mb"] > 0 and s["load_s"] > 0
    assert out["load"]["ours"]["params"] == out["load"]["diffusers"]["params"]
    # same weights read back both ways
    assert out["load"]["ours"]["runs"][0]["checksum"] == pytest.approx(out["load"]["diffusers"]["runs"][0]["checksum"],
                                                                      rel=1e-5)
    assert {"peak_rss_mb", "load_rss_mb", "load_s"} <= set(out["ratio"])
    assert "ours/diff" in capsys.readouterr().out


def test_kernel_speed_script_times_every_kernel_and_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("MMDIT_KERNELS", "auto")  # the script forces triton; restored after
    out = tmp_path / "kernels.json"
    kernel_speed.main(["--small", "--no-compile", "--warmup", "0", "--iters", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    rows = report["rows"]
    cases = {(r["kernel"], r["pass"]) for r in rows}
    assert cases == {(k, p) for k in ("norm_modulate", "gated_residual", "gated_residual+fork", "qk_norm_rope")
                     for p in ("fwd", "fwd+bwd")}
    assert {r["impl"] for r in rows} == {"triton", "eager"} and len(rows) == 16
    for r in rows:
        assert r["ms"] > 0 and r["GB/s"] == pytest.approx(r["bytes"] / r["ms"] / 1e6)


def test_guidance_compare_writes_a_contact_sheet_and_detail_numbers(tmp_path, capsys):
    import guidance_compare
    from PIL import Image

    sheet, out = tmp_path / "sheet.png", tmp_path / "compare.json"
    guidance_compare.main(["--prompt", "a red circle on a blue background", "--seeds", "0", "--steps", "2",
                           "--out", str(sheet), "--json", str(out)])
    report = json.loads(out.read_text())
    assert set(report["mean"]) == {"CFG", "CFG+DG 2", "CFG+SLG 2.5", "CFG+PAG 2"}
    assert all(v > 0 for v in report["mean"].values())
    assert Image.open(sheet).size == (4 * 128, 14 + 128)  # 4 methods x 1 image, 64 px magnified 2x
    assert len({round(v, 6) for v in report["mean"].values()}) == 4  # every method changes the image
    assert "high-frequency energy" in capsys.readouterr().out


@pytest.mark.parametrize("total, layers", [(24, (7, 8, 9)), (38, (11, 12, 13)), (4, (1, 2)), (2, (0,)), (1, (0,))])
def test_default_slg_layers_start_at_30_percent_and_spare_the_last_block(total, layers):
    assert common.slg_layers(total) == layers
    assert common.slg_layers(total, "3,5") == (3, 5)


def test_regional_compile_script_times_each_way_and_matches_eager(tmp_path, capsys):
    import regional_compile

    out = regional_compile.run(regional_compile.parse(["--layers", "3", "--heads", "1", "--size", "4",
                                                       "--text-len", "4", "--steps", "1",
                                                       "--backend", "aot_eager", "--json", str(tmp_path / "rc.json")]))
    assert set(out["ways"]) == {"eager", "whole", "regional"} and out["blocks"] == 3
    assert all(w["rel_err_vs_eager"] <= 1e-5 and w["step_ms"] > 0 for w in out["ways"].values())
    assert json.loads((tmp_path / "rc.json").read_text())["ways"]["regional"]["first_step_s"] > 0


def test_teacache_fit_script_fits_one_coefficient_per_power(tmp_path):
    import teacache_fit

    out = teacache_fit.main(["--seeds", "0", "--steps", "4", "--degree", "2", "--json", str(tmp_path / "fit.json")])
    assert out["pairs"] == len(teacache_fit.PROMPTS) * 3  # 4 steps: 3 consecutive pairs per trajectory
    assert len(out["coefficients"]) == 3 and all(math.isfinite(c) for c in out["coefficients"])
    assert out["x_range"][1] > 0 and math.isfinite(out["r2"])
    assert json.loads((tmp_path / "fit.json").read_text())["coefficients"] == out["coefficients"]


def test_cache_quality_script_counts_skips_and_threshold_zero_changes_nothing(tmp_path, capsys):
    import cache_quality

    out = cache_quality.main(["--seeds", "0", "--steps", "5", "--fbcache", "0", "1e9", "--teacache", "0",
                              "--teacache-coefficients", "1", "0", "--json", str(tmp_path / "cq.json")])
    rows = {(r["policy"], r["dg"]): r for r in out["rows"]}
    for dg in {r["dg"] for r in out["rows"]}:
        for name in ("none", "fbcache:0", "teacache:0"):
            assert rows[name, dg]["skipped_per_image"] == 0 and rows[name, dg]["psnr_db"] == math.inf
        never = rows["fbcache:1e+09", dg]  # every middle step skipped: the first and the last are computed
        assert never["skipped_per_image"] == 3 and 0 < never["psnr_db"] < math.inf
    assert "steps skipped" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "cq.json").read_text())["rows"]) == len(out["rows"])
