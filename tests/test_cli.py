"""The `mmdit` command on the shipped tiny model: images, reports, and one clear error each."""
import json

import numpy as np
import pytest
from PIL import Image

from mmdit.cli import main


def test_generate_writes_a_png_with_its_settings(tmp_path, capsys):
    out = tmp_path / "img.png"
    assert main(["generate", "--prompt", "a red circle on a blue background", "--steps", "6",
                 "--seed", "3", "--output", str(out)]) == 0
    image = Image.open(out)
    assert image.size == (64, 64)
    settings = json.loads(image.text["mmdit"])
    assert settings["prompt"] == "a red circle on a blue background" and settings["seed"] == 3
    assert settings["steps"] == 6 and settings["cfg"] == 4.0
    again = tmp_path / "again.png"
    main(["generate", "--prompt", "a red circle on a blue background", "--steps", "6", "--seed", "3",
          "--output", str(again)])
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(again)))  # seeded: reproducible


def test_generate_with_detail_guidance_changes_the_image(tmp_path):
    paths = [tmp_path / f"{dg}.png" for dg in (0, 2)]
    for dg, path in zip((0, 2), paths):
        assert main(["generate", "--prompt", "a yellow triangle on a purple background", "--steps", "6",
                     "--dg", str(dg), "--output", str(path)]) == 0
    a, b = (np.asarray(Image.open(p), dtype=np.float32) for p in paths)
    assert np.abs(a - b).mean() > 1.0  # 8-bit levels


@pytest.mark.parametrize("argv,message", [
    (["--device", "cuda"], "asked for a GPU"),
    (["--model", "/no/such/folder"], "does not exist"),
    (["--height", "30"], "multiples of 4"),
    (["--model", "someone/not-cached"], "not in the local Hugging Face cache"),
])
def test_generate_errors_are_one_clear_line(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    if "cuda" in argv:
        monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["generate", "--prompt", "x", "--output", str(tmp_path / "x.png"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_analyze_and_calibrate_on_the_tiny_model(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["analyze-ma", "--prompt", "a red circle on a blue background", "--prompt",
                 "a black square on a yellow background", "--steps", "4", "--out", str(out)]) == 0
    report = json.loads((out / "ma_report.json").read_text())
    assert report["model"]["blocks"] == 4
    assert sorted(p.name for p in out.glob("*.png")) == ["channel_magnitude.png", "cond_vs_uncond.png",
                                                        "gate_vs_hidden.png", "ma_vs_sigma_and_prompt.png"]
    assert main(["calibrate-ma", "--steps", "4", "--ratio", "3"]) == 0
    assert "spec: channels [48" in capsys.readouterr().out  # the shipped model's strongest channel
    assert main(["calibrate-ma", "--steps", "4"]) == 2  # the 50x rule finds no MA in so small a model


def test_generate_compiled_equals_eager_and_says_it_compiles(tmp_path, capsys):
    """--compile: the transformer compiled once for the step's shape (CFG+DG: one graph with the
    fork), the same image as eager up to compiler rounding."""
    args = ["generate", "--prompt", "a red circle on a blue background", "--steps", "3", "--dg", "1"]
    assert main(args + ["--output", str(tmp_path / "eager.png")]) == 0
    capsys.readouterr()
    assert main(args + ["--compile", "--output", str(tmp_path / "compiled.png")]) == 0
    err = capsys.readouterr().err
    assert err.count("compiling the transformer for 2 rows") == 1  # [uncond | cond], forked inside
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.float32) for n in ("eager", "compiled"))
    assert np.abs(a - b).max() <= 1.0  # 8-bit levels: at most one rounding step apart
