"""benchmarks/dg_detail.py: its HF measure, and a smoke run on the shipped tiny model."""
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))

import dg_detail  # noqa: E402
from mmdit import tiny  # noqa: E402
from mmdit.tiny import shapes  # noqa: E402


def test_hf_energy_is_parseval_and_sees_texture():
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    total = (x - x.mean((-2, -1), keepdim=True)).square().sum((1, 2, 3)) / 64 ** 2
    assert torch.allclose(dg_detail.hf_energy(x, cutoff=-1.0), total, rtol=1e-4)  # every frequency: the variance
    data = shapes.batch(64, 3)
    blurred = torch.nn.functional.avg_pool2d(data.images, 5, 1, 2, count_include_pad=False)
    textured = data.texture > 0
    assert (dg_detail.hf_energy(blurred) < 0.5 * dg_detail.hf_energy(data.images))[textured].float().mean() > 0.9


def test_benchmark_runs_on_the_shipped_model(tmp_path, capsys):
    assert dg_detail.main(["--n", "2", "--steps", "2", "--dg", "1", "--random-draws", "1", "--threads", "1",
                           "--json", str(tmp_path / "r.json"), "--sheet", str(tmp_path / "s.png")]) == 0
    out = capsys.readouterr().out
    for setting in ("render", "cond only", "DG 1", "CFG 4", "CFG 4 + DG 1", "CFG 4, MA zeroed", "CFG 4, random zeroed"):
        assert f"\n{setting} " in out
    assert (tmp_path / "s.png").is_file() and (tmp_path / "r.json").is_file()
    model = tiny.load_tiny()
    data, captions, named = dg_detail.prompts_for(model, 4)
    knows = "striped" in model.conditioner.tokenizer.vocab  # the first shipped model knows no texture words
    assert bool(named.all()) == knows and any(t in c for c in captions for t in shapes.TEXTURES) == knows
