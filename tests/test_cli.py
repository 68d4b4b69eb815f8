"""The `mmdit` command on the shipped tiny model: images, reports, and one clear error each."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmdit import tiny
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


def test_generate_sampler_and_schedule(tmp_path):
    """--sampler / --schedule reach the Pipeline (the image changes) and the PNG's settings."""
    paths = {name: tmp_path / f"{name}.png" for name in ("euler", "heun")}
    for name, path in paths.items():
        assert main(["generate", "--prompt", "a red circle on a blue background", "--steps", "3", "--sampler", name,
                     "--schedule", "karras", "--output", str(path)]) == 0
    settings = json.loads(Image.open(paths["heun"]).text["mmdit"])
    assert settings["sampler"] == "heun" and settings["schedule"] == "karras"
    a, b = (np.asarray(Image.open(p), dtype=np.float32) for p in paths.values())
    assert np.abs(a - b).mean() > 0.1  # 8-bit levels


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
    assert "no massive channel at block 2" in capsys.readouterr().err


def test_calibrate_stores_the_spec_in_a_tiny_folder(tmp_path, capsys):
    """calibrate-ma --model FOLDER on a folder written by `mmdit train`: the spec and its table go
    into that folder's config.json, where load_tiny reads them; nothing else there changes."""
    folder = tmp_path / "tiny"
    shutil.copytree(tiny.default_folder(), folder)
    before = json.loads((folder / "config.json").read_text())
    assert main(["calibrate-ma", "--model", str(folder), "--steps", "4", "--ratio", "3", "--top-k", "2"]) == 0
    assert f"stored in {folder / 'config.json'}" in capsys.readouterr().out
    after = json.loads((folder / "config.json").read_text())
    assert after["ma_calibration"]["command"] == "calibrate-ma" and after["ma_calibration"]["rule"]["ratio"] == 3
    assert {k: v for k, v in after.items() if k not in ("ma", "ma_calibration")} == \
        {k: v for k, v in before.items() if k not in ("ma", "ma_calibration")}
    spec = tiny.load_tiny(folder).transformer.ma
    assert spec.block == 2 and spec.channels[0] == 48 and len(spec.channels) <= 2
    assert list(spec.channels) == after["ma_calibration"]["spec"]["channels"]


@pytest.mark.slow
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


# ---- the newcomer's first hour: paths from the caller's folder, one line per bad argument --------

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle on a blue background"


def cli(argv) -> int:
    """``main`` as the shell sees it: argparse's own errors exit instead of returning."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def one_error_line(capsys, message: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert message in err, err
    return err


@pytest.fixture
def outside(tmp_path, monkeypatch):
    """A working folder outside the checkout, as a user's shell would have."""
    folder = tmp_path / "user"
    folder.mkdir()
    monkeypatch.chdir(folder)
    monkeypatch.setenv("MMDIT_CACHE", str(tmp_path / "cache"))
    return folder


def test_relative_paths_mean_the_callers_folder(outside, capsys):
    from safetensors.torch import save_file

    import mmdit

    assert cli(["generate", "--prompt", PROMPT, "--steps", "2", "--output", "pics/rel.png"]) == 0
    assert Image.open(outside / "pics" / "rel.png").size == (64, 64)
    model = mmdit.build_transformer("sd3-medium", num_layers=1, num_heads=1, pos_embed_max_size=4)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, "mine.safetensors")
    capsys.readouterr()
    assert cli(["inspect", "mine.safetensors"]) == 0 and "SD3 / SD3.5" in capsys.readouterr().out
    assert cli(["analyze-ma", "--prompt", PROMPT, "--steps", "2", "--no-plots", "--out", "report"]) == 0
    assert json.loads((outside / "report" / "ma_report.json").read_text())["model"]["blocks"] == 4
    # a model written by `mmdit train` is a --model for `mmdit generate`
    assert cli(["train", "--steps", "2", "--batch-size", "2", "--layers", "1", "--log-every", "1",
                "--out", "mine"]) == 0
    assert cli(["generate", "--model", "mine", "--prompt", PROMPT, "--steps", "2", "--output", "mine.png"]) == 0
    settings = json.loads(Image.open(outside / "mine.png").text["mmdit"])
    assert settings["model"] == "mine" and settings["steps"] == 2


BAD = [
    (["generate", "--steps", "0"], "steps must be a whole number from 1 to 1000, got 0"),
    (["generate", "--steps", "1000000000"], "from 1 to 1000"),
    (["generate", "--steps", "two"], "expected a whole number, got 'two'"),
    (["generate", "--cfg", "-1"], "cfg must be a finite number >= 0 (1 turns it off)"),
    (["generate", "--cfg", "nan"], "cfg must be a finite number"),
    (["generate", "--dg", "inf"], "dg must be a finite number >= 0 (0 turns it off)"),
    (["generate", "--guidance", "-3"], "guidance must be a finite number >= 0"),
    (["generate", "--height", "0"], "height must be a whole number >= 1"),
    (["generate", "--height", "30"], "multiples of 4"),
    (["generate", "--width", "128"], "at most 64 pixels for this model (pixel space, no VAE"),
    (["generate", "--cfg-interval", "0.8", "0.2"], "0 <= start <= stop <= 1"),
    (["generate", "--dg-interval", "0", "2"], "a sigma must be a number in [0, 1]"),
    (["generate", "--seed", "-1"], "seed must be a whole number from 0"),
    (["generate", "--max-sequence-length", "0"], "max sequence length must be a whole number from 1 to 512"),
    (["generate", "--output", "out.jpg"], "--output must name a .png file"),
    (["generate", "--sampler", "ddim"], "argument --sampler: invalid choice: 'ddim'"),
    (["generate", "--schedule", "linear"], "argument --schedule: invalid choice: 'linear'"),
    (["generate", "--colour", "red"], "unrecognized arguments: --colour red"),
    (["generate", "--model", "/no/such/folder"], "does not exist"),
    (["generate", "--model", "someone/not-cached"], "not in the local Hugging Face cache"),
    (["generate", "--device", "cuda"], "asked for a GPU"),
    (["analyze-ma", "--block", "9"], "--block 9 is past the last block of this model (it has 4: 0..3)"),
    (["analyze-ma", "--every", "0"], "--every must be a whole number >= 1"),
    (["calibrate-ma", "--ratio", "0"], "--ratio must be a finite number > 0"),
    (["calibrate-ma", "--top-k", "0"], "--top-k must be a whole number >= 1"),
    (["calibrate-ma", "--rho", "2"], "--rho must be a number in [0, 1]"),
    (["train", "--steps", "0"], "--steps must be a whole number >= 1"),
    (["train", "--batch-size", "0"], "--batch-size must be a whole number from 1 to 4096"),
    (["train", "--ema", "1"], "--ema must be a number in [0, 1)"),
    (["train", "--caption-dropout", "2"], "--caption-dropout must be a number in [0, 1]"),
    (["inspect", "no/such.safetensors"], "does not exist"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_arguments_are_one_line_and_write_nothing(argv, message, outside, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(outside.parent / "hub"))
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    prompt = ["--prompt", PROMPT] if argv[0] != "inspect" and argv[0] != "train" else []
    assert cli([*argv, *prompt]) == 2
    one_error_line(capsys, message)
    assert list(outside.iterdir()) == []  # no image, no report folder, no model


def test_analyze_without_matplotlib_says_so_first(outside, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else
                        find_spec(name, *a))
    assert cli(["analyze-ma", "--prompt", PROMPT, "--steps", "2"]) == 2
    one_error_line(capsys, "run with --no-plots")
    assert list(outside.iterdir()) == []


def test_help_is_for_users(capsys):
    texts = {}
    for command in ("", "generate", "inspect", "analyze-ma", "calibrate-ma", "train"):
        assert cli([command, "--help"] if command else ["--help"]) == 0
        texts[command] = capsys.readouterr().out
    assert all("_add_" not in t and "``" not in t for t in texts.values())
    assert "--seed SEED" in texts["generate"] and "seed of the initial noise" in texts["generate"]
    assert "(default: out.png)" in texts["generate"] and "(default: 2500)" in texts["train"]
    assert "(default: tiny-shapes)" in texts["train"]
    assert "bash run.sh train --threads 1 --out tiny-shapes" in (ROOT / "docs" / "tiny-model.md").read_text()


def test_unknown_words_warn_once_naming_them_and_the_vocabulary():
    import warnings

    from mmdit.tiny import load_tiny

    conditioner = load_tiny().conditioner
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        conditioner.encode(["a crimson circle on a blue backdrop", "a crimson square"])
        conditioner.encode(["a crimson circle"])
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "'backdrop', 'crimson'" in message and "<unk>" in message
    assert "crimson circle" not in message  # it names the words, not the prompt
    assert "It knows: a against an background black blue circle" in message


def _fake_checkout(tmp_path) -> Path:
    """run.sh and setup.py in a folder whose .venv is already set up, with a stand-in ``mmdit``
    and ``python`` that print the folder they run in."""
    import shutil

    co = tmp_path / "checkout"
    (co / ".venv" / "bin").mkdir(parents=True)
    shutil.copy(ROOT / "run.sh", co)
    shutil.copy(ROOT / "setup.py", co)
    import hashlib

    (co / ".venv" / ".mmdit-installed").write_text(hashlib.sha256((co / "setup.py").read_bytes()).hexdigest()[:16])
    for tool in ("mmdit", "python"):
        (co / ".venv" / "bin" / tool).write_text('#!/bin/sh\necho "$(basename "$0") in $(pwd): $*"\n')
        (co / ".venv" / "bin" / tool).chmod(0o755)
    return co


def test_run_sh_runs_commands_in_the_callers_folder(tmp_path):
    import subprocess

    co, user = _fake_checkout(tmp_path), tmp_path / "user"
    user.mkdir()

    def run(*args):
        return subprocess.run(["bash", str(co / "run.sh"), *args], cwd=user, capture_output=True, text=True)

    assert run("generate", "--output", "rel.png").stdout.strip() == f"mmdit in {user}: generate --output rel.png"
    assert run("inspect", "my.safetensors").stdout.strip() == f"mmdit in {user}: inspect my.safetensors"
    assert run("test", "-k", "x").stdout.strip() == f"python in {co}: -m pytest -q -n 2 tests -k x"  # the suite's home
    bad = run("bogus")
    assert bad.returncode == 2 and "usage: bash run.sh" in bad.stderr
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("bash run.sh test")


def test_generate_with_every_guidance_term_in_one_call_per_step(tmp_path, capsys):
    out = tmp_path / "all.png"
    assert main(["generate", "--prompt", "a red circle on a blue background", "--steps", "4", "--dg", "1",
                 "--slg", "2", "--slg-layers", "1,2", "--slg-start", "0", "--slg-stop", "1", "--pag", "1",
                 "--pag-layers", "2", "--cfg-zero-star", "--output", str(out)]) == 0
    settings = json.loads(Image.open(out).text["mmdit"])
    assert settings["slg_layers"] == [1, 2] and settings["pag"] == 1.0 and settings["cfg_zero_star"] is True
    plain = tmp_path / "plain.png"
    assert main(["generate", "--prompt", "a red circle on a blue background", "--steps", "4", "--dg", "1",
                 "--output", str(plain)]) == 0
    a, b = (np.asarray(Image.open(p), dtype=np.float32) for p in (out, plain))
    assert np.abs(a - b).mean() > 1.0


def test_slg_and_pag_without_layers_use_the_default_blocks_and_say_so(tmp_path, capsys):
    out = tmp_path / "x.png"
    assert cli(["generate", "--prompt", "x", "--steps", "2", "--slg", "2", "--pag", "1", "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert "slg: no slg_layers given; using blocks [1, 2] (the default for a 4-block model)" in err
    assert "pag: no pag_layers given; using blocks [1] (the default for a 4-block model)" in err
    assert out.exists()


@pytest.mark.parametrize("argv,message", [
    (["--slg-layers", "9", "--slg", "2"], "slg_layers [9] outside 0..3 (this model has 4 blocks)"),
    (["--pag-layers", "x"], "--pag-layers must be block numbers like 7,8,9"),
    (["--apg", "--cfg-zero-star"], "choose one"),
])
def test_guidance_argument_errors_are_one_line(argv, message, tmp_path, capsys):
    out = tmp_path / "x.png"
    assert cli(["generate", "--prompt", "x", "--steps", "2", "--output", str(out), *argv]) == 2
    one_error_line(capsys, message)
    assert not out.exists()
