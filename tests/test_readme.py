"""The README's library snippets, run as written on small random models, so README and API agree.

Every ```python block of README.md runs, in order, in one namespace, in a folder holding
small stand-ins for the checkpoints it names. The only edits are the ones in SWAPS (device,
dtype, sizes that a small model cannot take); each must still be found in the README.
"""
import os
import re
from pathlib import Path

import pytest
import torch

import mmdit
from mmdit import ma

README = Path(__file__).resolve().parents[1] / "README.md"
FORWARD_TOL = 1e-5  # the same rows in a batch of 2 and of 1, fp32, relative to max |v|
SMALL_SD3 = "num_layers=2, num_heads=2, pos_embed_max_size=16"  # hidden 128; real context and pooled widths

SWAPS = [  # (as in the README, what the test runs instead)
    ("height=1024, width=1024", "height=32, width=32"),  # the stand-in pipeline's largest size is 48
    ("channels=(154, 1446), block=28", "channels=(5, 77), block=1"),  # the stand-in FLUX has 3 blocks of 128
    ('build_transformer("sd3.5-medium", num_layers=2)', f'build_transformer("sd3.5-medium", {SMALL_SD3})'),
    ('build_transformer("sd3.5-medium", num_layers=12, device="cuda")',
     f'build_transformer("sd3.5-medium", {SMALL_SD3}, device="cpu")'),
    ('"stabilityai/stable-diffusion-3.5-large"', "str(PIPELINE)"),
    ("dtype=torch.bfloat16", "dtype=torch.float32"),
    ('device="cuda"', 'device="cpu"'),  # after the swaps that contain it
    ("compile_blocks(model) ", 'compile_blocks(model, backend="eager") '),  # inductor would take a minute
]


def snippets() -> list[str]:
    text = README.read_text()
    for old, _ in SWAPS:
        assert old in text, f"README.md no longer contains {old!r}: update tests/test_readme.py"
    for old, new in SWAPS:
        text = text.replace(old, new)
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.fixture
def stand_ins(tmp_path, monkeypatch):
    """flux1-dev.safetensors (FLUX.1-dev's input widths, 1 + 2 blocks of one 128-wide head), a
    small SD3.5-style diffusers pipeline folder with its MA spec cached, and a loader."""
    from safetensors.torch import save_file
    from peers import sd3_folder

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MMDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    flux = mmdit.build_transformer("flux.1-dev", num_double=1, num_single=2, num_heads=1)
    save_file({k: v.contiguous() for k, v in flux.state_dict().items()}, str(tmp_path / "flux1-dev.safetensors"))
    folder, _ = sd3_folder(tmp_path / "sd3")
    files = sorted(str(f) for f in (folder / "transformer").glob("*.safetensors"))
    ma.save_spec(mmdit.MASpec(channels=(3,), block=1), ma.checkpoint_hash(files))  # as `mmdit calibrate-ma` would
    g = torch.Generator().manual_seed(1)
    loader = [(torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 7, 4096, generator=g),
               torch.randn(2, 2048, generator=g))]
    return {"PIPELINE": folder, "loader": loader}


def test_readme_library_snippets_run(stand_ins, capsys):
    blocks = snippets()
    assert len(blocks) == 6  # text to image, the transformer alone, sampling, fp8 and LoRA, parallel, a trainer
    namespace = dict(stand_ins)
    for code in blocks:
        exec(compile(code, str(README), "exec"), namespace)
    ns = namespace
    assert len(ns["images"]) == 4 and ns["images"][0].size == (16, 16)  # default: sample_size 8 x the VAE's 2
    assert ns["steps_seen"] == [0, 1, 2, 3]
    assert ns["fox"].size == (32, 32)  # parallel="branch" in one process: as without it
    assert ns["v"].shape == (1, 16, 64, 64) and ns["v3"].shape == (3, 16, 64, 64)
    assert (ns["v3"][:2] - ns["v"]).abs().max() <= FORWARD_TOL * ns["v"].abs().max()  # rows 0, 1: plain x
    assert (ns["v3"][2] - ns["v3"][1]).abs().max() > 0.01 * ns["v"].abs().max()  # row 2: disrupted
    assert "step 3: sigma 0.000" in capsys.readouterr().out
    assert torch.isfinite(ns["loss"]) and ns["ema"].updates == 1
    assert Path("my_lora.safetensors").is_file() and not ns["style"].adapters  # saved, applied, removed


def test_the_repository_stands_alone():
    """No file points to design notes that live outside the repository; docs/architecture.md
    holds what the code relies on."""
    root = README.parent
    outside = re.compile(r"REFERENCE\.md|PAPER\.md|DESIGN\.md|\.\./shared")
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("build", "__pycache__")]
        files += [Path(folder, n) for n in names if n.endswith((".py", ".md", ".sh"))]
    assert [str(p.relative_to(root)) for p in files if outside.search(p.read_text(errors="replace"))] == []
    assert (root / "docs" / "architecture.md").is_file()
