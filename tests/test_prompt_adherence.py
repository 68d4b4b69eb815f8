"""benchmarks/prompt_adherence.py on the shipped tiny model: it reads colours and shapes, and a
caption moves the velocity (a collapsed text path would give ~0)."""
import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))

import prompt_adherence  # noqa: E402
from mmdit import tiny  # noqa: E402


def test_shipped_model_follows_and_feels_its_prompts(capsys):
    r = prompt_adherence.run(tiny.load_tiny(), n=4, steps=6, cfg=4.0, data_seed=777)
    assert r["background"] == 1.0 and r["shape_colour"] >= 0.75  # 100% / 100% at 16 prompts and 12 steps
    assert 0.0 <= r["shape"] <= 1.0 and set(r["shape_by_kind"]) <= {"circle", "square", "triangle"}
    assert r["context_norm"] > 1.0 and r["cond_vs_uncond"] > 0.1  # measured 8.1 and 0.41
    assert prompt_adherence.main(["--n", "2", "--steps", "2"]) == 0
    assert "shipped: 2 prompts, 2 steps, cfg 4: background" in capsys.readouterr().out


def test_one_prompt_is_one_clear_error():
    with pytest.raises(ValueError, match="at least 2 prompts"):
        prompt_adherence.run(tiny.load_tiny(), n=1, steps=2, cfg=4.0, data_seed=777)
    with pytest.raises(SystemExit) as exit_:
        prompt_adherence.main(["--n", "1"])
    assert exit_.value.code == 2
