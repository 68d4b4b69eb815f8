"""What a newcomer runs into, each as the command a user would type: Ctrl-C, damaged model folders,
prompt files with nothing to do, single transformer files, progress in a log, unwritable outputs."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import save_file

import mmdit
from mmdit.cli import main
from mmdit.tiny import load_tiny, save_tiny


def _default_sigint():
    """In the child: SIGINT's default action, even where the suite itself runs with SIGINT ignored
    (a background job of a non-interactive shell), so Python installs its KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run(*args, cwd, **kw):
    return subprocess.run([sys.executable, "-m", "mmdit", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, **kw)


@pytest.mark.slow
def test_ctrl_c_during_generate_is_one_line_and_leaves_no_file(tmp_path):
    """A real SIGINT while sampling: exit 130, one line on stderr, no PNG and no .part file."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mmdit", "generate", "--prompt", "a red circle", "--steps", "1000",
                             "--output", "out.png"], cwd=tmp_path, stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env, preexec_fn=_default_sigint)
    deadline = time.time() + 120
    line = ""
    while "step" not in line and time.time() < deadline:  # sampling has started (a log: a line per 100 steps)
        line = proc.stderr.readline()
        assert line or proc.poll() is None, "generate ended before it was interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip().splitlines() == ["mmdit generate: interrupted"], err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_ctrl_c_during_train_saves_a_checkpoint_that_resumes(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = ["train", "--out", "run", "--steps", "100000", "--batch-size", "2", "--size", "16", "--patch", "4",
            "--layers", "1", "--width", "32", "--log-every", "1", "--no-calibrate", "--threads", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "mmdit", *args], cwd=tmp_path, stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env, preexec_fn=_default_sigint)
    deadline = time.time() + 120
    line = ""
    while not line.startswith("step 2/") and time.time() < deadline:
        line = proc.stdout.readline()
        assert line or proc.poll() is None, "train ended before it was interrupted"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "mmdit train: interrupted", err
    assert "checkpoint saved to" in out and (tmp_path / "run" / "checkpoint.pt").is_file()
    resumed = run(*[a if a != "100000" else "3" for a in args], "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout


def _interrupt(monkeypatch, stage: str):
    """Ctrl-C in the MA commands' long parts: the second sampling step, or probing the samples."""
    from mmdit.ma import report

    real, calls = getattr(report, stage), []

    def interrupted(*args, **kw):
        calls.append(1)
        if stage != "sample" or len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(report, stage, interrupted)


@pytest.mark.parametrize("command,stage", [("analyze-ma", "sample"), ("analyze-ma", "collect"),
                                           ("calibrate-ma", "sample"), ("calibrate-ma", "find_massive")])
def test_ctrl_c_in_the_ma_commands_is_one_line_and_writes_nothing(command, stage, tiny_folder, tmp_path, capsys,
                                                                  monkeypatch):
    monkeypatch.setenv("MMDIT_CACHE", str(tmp_path / "cache"))
    config = (tiny_folder / "config.json").read_bytes()
    _interrupt(monkeypatch, stage)
    extra = ["--out", str(tmp_path / "report")] if command == "analyze-ma" else []
    assert main([command, "--model", str(tiny_folder), "--steps", "4", "--ratio", "3", *extra]) == 130
    assert capsys.readouterr().err.strip().splitlines() == [f"mmdit {command}: interrupted"]
    assert not (tmp_path / "report").exists() and not (tmp_path / "cache").exists()
    assert (tiny_folder / "config.json").read_bytes() == config  # no spec stored


@pytest.fixture
def tiny_folder(tmp_path):
    shipped = load_tiny()
    folder = tmp_path / "mine"
    save_tiny(folder, shipped.transformer, shipped.conditioner, shipped.settings)
    return folder


@pytest.mark.parametrize("damage,named", [
    (lambda f: (f / "transformer.safetensors").write_bytes((f / "transformer.safetensors").read_bytes()[:5000]),
     "transformer.safetensors is not a readable safetensors file"),
    (lambda f: (f / "text_encoder.safetensors").unlink(), "text_encoder.safetensors is missing"),
    (lambda f: (f / "config.json").write_text("{ not json"), "config.json is not valid JSON"),
])
def test_a_damaged_tiny_folder_is_one_line_naming_the_file(tiny_folder, tmp_path, capsys, damage, named):
    damage(tiny_folder)
    out = tmp_path / "x.png"
    assert main(["generate", "--model", str(tiny_folder), "--prompt", "x", "--steps", "2", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err and "Traceback" not in err, err
    assert not out.exists()


def test_prompt_files_with_nothing_to_do_say_so(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert main(["generate", "--prompts", str(empty), "--outdir", str(tmp_path / "out")]) == 0
    assert f"0 prompts in {empty} (every line is blank): nothing to draw" in capsys.readouterr().err
    lines = tmp_path / "three.txt"
    lines.write_text("a red circle\na blue square\na green triangle\n")
    outdir = tmp_path / "out"
    assert main(["generate", "--prompts", str(lines), "--outdir", str(outdir), "--steps", "2"]) == 0
    capsys.readouterr()
    assert main(["generate", "--prompts", str(lines), "--outdir", str(outdir), "--steps", "2"]) == 0
    assert f"3 of 3 images already in {outdir}: nothing to draw" in capsys.readouterr().err


def test_progress_in_a_log_file_is_a_line_per_tenth(tmp_path):
    done = run("generate", "--prompt", "a red circle", "--steps", "20", "--output", "o.png", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    steps = [line for line in done.stderr.splitlines() if line.startswith("step ")]
    assert [s.split()[1] for s in steps] == [f"{i}/20" for i in range(2, 21, 2)] and "\r" not in done.stderr


def test_version_and_an_unwritable_output_before_anything_loads(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("mmdit ")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["generate", "--prompt", "x", "--output", str(blocker / "out.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mmdit generate: error: --output: {blocker} is a file, not a folder; choose another output path"
    if os.geteuid() != 0:  # root writes anywhere: the read-only folder case needs a user
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        assert main(["generate", "--prompt", "x", "--output", str(ro / "out.png")]) == 2
        assert "can't write in" in capsys.readouterr().err and ".part" not in str(list(ro.iterdir()))


def test_one_transformer_file_with_its_text_encoders_from_a_folder(tmp_path, capsys):
    """`generate --model FILE --text-from FOLDER`: the file's transformer, the folder's text encoders
    and VAE; without --text-from a file of no official preset is one clear error."""
    from peers import sd3_folder

    folder, _ = sd3_folder(tmp_path / "pipe")
    model = mmdit.load_transformer(folder / "transformer")
    single = tmp_path / "mine.safetensors"
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(single))
    common = ["--prompt", "a fox", "--steps", "2", "--height", "16", "--width", "16", "--seed", "1"]
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert main(["generate", "--model", str(folder), *common, "--output", str(a)]) == 0
    assert main(["generate", "--model", str(single), "--text-from", str(folder), *common, "--output", str(b)]) == 0
    assert f"text encoders, VAE and scheduler from {folder}" in capsys.readouterr().err
    assert a.read_bytes() != b"" and Path(a).stat().st_size > 0
    from PIL import Image
    import numpy as np
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    assert main(["generate", "--model", str(single), *common, "--output", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pass text_from= (CLI: --text-from REPO_OR_FOLDER)" in err


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    """A diffusers SD3 pipeline folder (random weights), as `save_pretrained` writes it."""
    import peers

    return peers.sd3_folder(tmp_path_factory.mktemp("sd3"))[0]


@pytest.mark.parametrize("name,damage,named", [
    ("transformer/diffusion_pytorch_model.safetensors", lambda b: b[:3000], "is not a readable safetensors file"),
    ("text_encoder/model.safetensors", lambda b: b[:3000], "is not a readable safetensors file"),
    ("transformer/config.json", lambda b: b"{ not json", "is not valid JSON"),
    ("model_index.json", lambda b: b"{ not json", "is not valid JSON"),
])
def test_a_damaged_diffusers_folder_is_one_line_naming_the_file(pipeline_folder, tmp_path, capsys, name, damage,
                                                                named):
    """The same checks as for single files and tiny folders, for a pipeline folder's parts."""
    path = pipeline_folder / name
    good = path.read_bytes()
    path.write_bytes(damage(good))
    try:
        out = tmp_path / "x.png"
        assert main(["generate", "--model", str(pipeline_folder), "--prompt", "x", "--steps", "2",
                     "--output", str(out)]) == 2
    finally:
        path.write_bytes(good)
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and f"{path} {named}" in err and "Traceback" not in err, err
    assert not out.exists()
