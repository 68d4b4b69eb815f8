"""The documentation's snippets and commands, checked against the code, so README, docs/ and API agree.

Every ```python block of README.md and of each page in docs/ runs: a page's blocks in order,
in one namespace, in a fresh folder holding small stand-ins for the checkpoints they name.
The only edits are the ones in SWAPS (device, dtype, sizes that a small model cannot take);
each must still be found in some page's snippets. After a page has run, its check in PAGES
looks at what the snippets made.

Every ```bash block is read, not run: a command must name an ``mmdit`` subcommand that run.sh
and ``mmdit --help`` know, with options that ``mmdit SUB --help`` shows, or a file of the
checkout that exists, with options its source defines. Relative links between the pages must
point to files and headings that exist.
"""
import contextlib
import io
import os
import re
import shlex
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

import mmdit
from mmdit import ma
from mmdit.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]
FORWARD_TOL = 1e-5  # the same rows in a batch of 2 and of 1, fp32, relative to max |v|
SMALL_SD3 = "num_layers=2, num_heads=2, pos_embed_max_size=16"  # hidden 128; real context and pooled widths

SWAPS = [  # (as in the docs, what the test runs instead)
    ("height=1024, width=1024", "height=32, width=32"),  # the stand-in pipeline's largest size is 48
    ("channels=(154, 1446), block=28", "channels=(5, 77), block=1"),  # the stand-in FLUX has 3 blocks of 128
    ('build_transformer("sd3.5-medium", num_layers=2)', f'build_transformer("sd3.5-medium", {SMALL_SD3})'),
    ('build_transformer("sd3.5-medium", num_layers=12, device="cuda")',
     f'build_transformer("sd3.5-medium", {SMALL_SD3}, device="cpu")'),
    ('"stabilityai/stable-diffusion-3.5-large"', "str(PIPELINE)"),
    ('"black-forest-labs/FLUX.2-klein-4B"', "str(FLUX2)"),
    ("dtype=torch.bfloat16", "dtype=torch.float32"),
    ('device="cuda"', 'device="cpu"'),  # after the swaps that contain it
    ("compile_blocks(model) ", 'compile_blocks(model, backend="eager") '),  # inductor would take a minute
]


def fenced(text: str, language: str) -> list[str]:
    """The ```language blocks of a markdown text, dedented (blocks inside list items are indented)."""
    pattern = rf"^([ \t]*)```{language}\n(.*?)^\1```"
    return [textwrap.dedent(m.group(2)) for m in re.finditer(pattern, text, flags=re.S | re.M)]


def snippets(path: Path) -> list[str]:
    """A page's python blocks, with the SWAPS applied."""
    blocks = fenced(path.read_text(), "python")
    for old, new in SWAPS:
        blocks = [b.replace(old, new) for b in blocks]
    return blocks


# ---- the pages' python snippets ---------------------------------------------------------

class StandIns:
    """Small stand-ins for the checkpoints the snippets name, each built once, on first use."""

    def __init__(self, root: Path):
        self.root, self.made = root, {}

    def provide(self, what: str, cwd: Path) -> dict:
        """The names a page's snippets use for ``what``, and its files in ``cwd``."""
        if what not in self.made:
            self.made[what] = getattr(self, f"_{what}")()
        if what == "flux":  # a relative path in the snippets
            (cwd / "flux1-dev.safetensors").symlink_to(self.made["flux"])
            return {}
        return self.made[what]

    def _flux(self) -> Path:
        """flux1-dev.safetensors: FLUX.1-dev's input widths, 1 + 2 blocks of one 128-wide head."""
        from safetensors.torch import save_file

        torch.manual_seed(0)
        flux = mmdit.build_transformer("flux.1-dev", num_double=1, num_single=2, num_heads=1)
        path = self.root / "flux1-dev.safetensors"
        save_file({k: v.contiguous() for k, v in flux.state_dict().items()}, str(path))
        return path

    def _pipeline(self) -> dict:
        """A small SD3.5-style diffusers pipeline folder with its MA spec cached (needs MMDIT_CACHE set)."""
        from peers import sd3_folder

        folder, _ = sd3_folder(self.root / "sd3")
        files = sorted(str(f) for f in (folder / "transformer").glob("*.safetensors"))
        ma.save_spec(mmdit.MASpec(channels=(3,), block=1), ma.checkpoint_hash(files))  # as `mmdit calibrate-ma` would
        return {"PIPELINE": folder}

    def _flux2(self) -> dict:
        """A tiny distilled Flux2KleinPipeline folder (peers_flux2) with its MA spec cached."""
        from peers_flux2 import pipeline_folder

        folder, _ = pipeline_folder(self.root / "flux2", "klein", is_distilled=True)
        files = sorted(str(f) for f in (folder / "transformer").glob("*.safetensors"))
        ma.save_spec(mmdit.MASpec(channels=(3,), block=1), ma.checkpoint_hash(files))
        return {"FLUX2": folder}

    def _loader(self) -> dict:
        g = torch.Generator().manual_seed(1)
        return {"loader": [(torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 7, 4096, generator=g),
                            torch.randn(2, 2048, generator=g))]}


def check_readme(ns: dict, printed: str) -> None:
    assert len(ns["images"]) == 4 and ns["images"][0].size == (16, 16)  # default: sample_size 8 x the VAE's 2
    assert ns["steps_seen"] == [0, 1, 2, 3]
    v, v3 = ns["v"], ns["v3"]
    assert v.shape == (1, 16, 64, 64) and v3.shape == (3, 16, 64, 64)
    assert (v3[:2] - v).abs().max() <= FORWARD_TOL * v.abs().max()  # rows 0, 1: plain x
    assert (v3[2] - v3[1]).abs().max() > 0.01 * v.abs().max()  # row 2: disrupted
    assert ns["small"].config.num_layers == 2
    assert "step 3: sigma 0.000" in printed
    assert ns["latents"].shape == (1, 16, 64, 64) and torch.isfinite(ns["latents"]).all()


def check_guidance(ns: dict, printed: str) -> None:
    runs = {k: ns[k] for k in ("cfg_dg", "every", "late_dg", "zero_star", "apg", "heun")}
    assert all(r.shape == (1, 3, 64, 64) and torch.isfinite(r).all() for r in runs.values())
    changed = {k: float((r - runs["cfg_dg"]).abs().max()) for k, r in runs.items() if k != "cfg_dg"}
    assert min(changed.values()) > 0.01, changed  # every setting changes the result
    assert ns["pixels"].shape == (1, 3, 64, 64) and 0 <= ns["pixels"].min() and ns["pixels"].max() <= 1
    assert ns["image"].size == (64, 64)
    assert all(ns[k][0].shape == (64, 64, 3) for k in ("first_block", "tea"))  # step caching
    with torch.no_grad():
        v, plain = ns["v"].detach(), ns["model"](ns["x"], ns["sigma"], **ns["cond"])
    assert v.shape == (3, 3, 64, 64)
    assert (v[0] - plain[0]).abs().max() <= FORWARD_TOL * plain.abs().max()  # row 0: the plain cond row
    assert min(float((v[i] - v[0]).abs().max()) for i in (1, 2)) > 0.01 * float(plain.abs().max())  # DG, SLG


def check_image_modes(ns: dict, printed: str) -> None:
    red, green, inpainted = (np.asarray(ns[k], dtype=np.float32) for k in ("red", "green", "inpainted"))
    assert red.shape == green.shape == inpainted.shape == (64, 64, 3)
    kept = np.asarray(ns["mask"]) < 128
    assert np.abs(inpainted - red)[kept].max() <= 1  # outside the mask: the image's own pixels (8-bit)
    assert np.abs(inpainted - red)[~kept].mean() > 10  # inside: repainted
    assert np.abs(green - red).mean() > 10  # img2img at strength 0.6 changed the picture


def check_checkpoints(ns: dict, printed: str) -> None:
    assert Path("my_lora.safetensors").is_file() and not ns["style"].adapters  # saved, applied, removed
    dtypes = {p.dtype for p in ns["model"].parameters()}
    assert torch.float8_e4m3fn in dtypes  # the Linears kept in fp8


def check_models(ns: dict, printed: str) -> None:
    assert (ns["steps"], ns["cfg"]) == (4, 1.0)
    images = {k: np.asarray(ns[k], dtype=np.float32) for k in ("cat", "hat", "pair", "redrawn", "detailed")}
    assert all(im.shape == (32, 32, 3) for im in images.values())  # the references' size by default
    assert all(np.abs(im - images["cat"]).mean() > 1 for k, im in images.items() if k != "cat")


def check_distributed(ns: dict, printed: str) -> None:
    assert ns["fox"].size == (32, 32)  # parallel="branch" in one process: as without it


def check_training(ns: dict, printed: str) -> None:
    assert torch.isfinite(ns["loss"]) and ns["ema"].updates == 1


@dataclass(frozen=True)
class Page:
    blocks: int  # its ```python blocks
    check: Callable[[dict, str], None]
    needs: tuple[str, ...] = field(default=())  # stand-ins (StandIns) its snippets use


PAGES = {
    "README.md": Page(3, check_readme, ("flux", "pipeline")),  # text to image, the transformer alone, sampling
    "docs/guidance.md": Page(2, check_guidance),  # the shipped tiny model, as written; step caching
    "docs/image-modes.md": Page(1, check_image_modes),  # the shipped tiny model, as written
    "docs/checkpoints.md": Page(1, check_checkpoints, ("flux",)),
    "docs/distributed.md": Page(1, check_distributed, ("pipeline",)),
    "docs/models.md": Page(1, check_models, ("flux2",)),
    "docs/training.md": Page(1, check_training, ("loader",)),
}


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    return StandIns(tmp_path_factory.mktemp("stand_ins"))


@pytest.mark.parametrize("page", list(PAGES))
def test_page_snippets_run(page, stand_ins, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MMDIT_CACHE", str(stand_ins.root / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec, blocks = PAGES[page], snippets(ROOT / page)
    assert len(blocks) == spec.blocks, f"{page} has {len(blocks)} python blocks; update PAGES in tests/test_readme.py"
    namespace = {}
    for what in spec.needs:
        namespace.update(stand_ins.provide(what, tmp_path))
    for code in blocks:
        exec(compile(code, str(ROOT / page), "exec"), namespace)
    spec.check(namespace, capsys.readouterr().out)


def test_every_page_with_snippets_is_run_and_every_swap_is_used():
    with_python = {str(p.relative_to(ROOT)) for p in DOCUMENTS if fenced(p.read_text(), "python")}
    assert with_python == set(PAGES), "a page's python snippets need an entry in PAGES (tests/test_readme.py)"
    code = "\n".join(b for p in DOCUMENTS for b in fenced(p.read_text(), "python"))
    for old, _ in SWAPS:
        assert old in code, f"no snippet contains {old!r} any more: update SWAPS in tests/test_readme.py"


# ---- the pages' bash commands -------------------------------------------------------------

ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
OUR_FILE = re.compile(r"^(benchmarks|tests)/[\w./-]+\.(py|sh)$")


def commands(text: str) -> list[list[str]]:
    """Every command line of the ```bash blocks, as words (continuations joined, comments dropped)."""
    out = []
    for block in fenced(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words and ENV.match(words[0]):  # OMP_NUM_THREADS=1 ...
                words = words[1:]
            if words:
                out.append(words)
    return out


def parse(words: list[str]) -> tuple[str, str, list[str]] | None:
    """("run.sh" | "mmdit" | "file" | "module", name, arguments), or None for other programs."""
    program, rest = os.path.basename(words[0]), words[1:]
    if program == "bash" and rest and rest[0].endswith("run.sh"):
        return "run.sh", rest[1] if len(rest) > 1 else "", rest[2:]
    if program == "bash" and rest and OUR_FILE.match(rest[0]):
        return "file", rest[0], rest[1:]
    if program == "mmdit":
        return "mmdit", rest[0] if rest else "", rest[1:]
    if program.startswith("python") or program == "torchrun":
        for i, word in enumerate(rest):  # the interpreter's or launcher's own options come first
            if word == "-c":
                return None
            if word == "-m" and i + 1 < len(rest):
                if rest[i + 1] == "mmdit":
                    return "mmdit", rest[i + 2] if i + 2 < len(rest) else "", rest[i + 3:]
                return "module", rest[i + 1], rest[i + 2:]
            if word.endswith((".py", ".sh")):
                return "file", word, rest[i + 1:]
    return None


def _help(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 0
    return out.getvalue()


@pytest.fixture(scope="module")
def known():
    """What the commands may name: run.sh's subcommands, mmdit's, and each one's options."""
    run_sh = {name for pattern in re.findall(r"^\s*([a-z|+-]+)\)", (ROOT / "run.sh").read_text(), flags=re.M)
              for name in pattern.split("|")}
    subcommands = set(re.findall(r"^ {4}([a-z][a-z-]+)(?:\s|$)", _help(["--help"]), flags=re.M))
    options = {sub: set(re.findall(r"--[a-z0-9][a-z0-9-]*", _help([sub, "--help"]))) for sub in subcommands}
    return run_sh, subcommands, options


def problems(words: list[str], known) -> list[str]:
    """What is wrong with one documented command (nothing: [])."""
    run_sh, subcommands, options = known
    parsed = parse(words)
    if parsed is None:
        return []
    kind, name, args = parsed
    line = " ".join(words)
    found = []
    flags = [a.split("=")[0] for a in args if a.startswith("--") and a != "--"]
    if kind == "run.sh" and name not in run_sh:
        found.append(f"{line!r}: run.sh has no subcommand {name!r} (it knows {sorted(run_sh)})")
    elif kind in ("run.sh", "mmdit") and name != "test":
        if name not in subcommands:
            found.append(f"{line!r}: `mmdit --help` lists no command {name!r} (it lists {sorted(subcommands)})")
        else:
            found += [f"{line!r}: `mmdit {name} --help` shows no {f}" for f in flags if f not in options[name]]
    if kind == "file":
        path = ROOT / name
        if not path.is_file():
            found.append(f"{line!r}: no file {name} in the checkout")
        elif path.suffix == ".py":
            source = path.read_text() + (ROOT / "benchmarks" / "common.py").read_text() * name.startswith("benchmarks/")
            found += [f"{line!r}: {name} defines no {f}" for f in flags if f'"{f}"' not in source]
    found += [f"{line!r}: no file {a} in the checkout" for a in args if OUR_FILE.match(a) and not (ROOT / a).is_file()]
    return found


def test_documented_commands_exist(known):
    checked, wrong = 0, []
    for doc in DOCUMENTS:
        for words in commands(doc.read_text()):
            checked += parse(words) is not None
            wrong += [f"{doc.relative_to(ROOT)}: {p}" for p in problems(words, known)]
    assert wrong == []
    assert checked >= 30  # the parser sees the pages' commands (about 40 today)


@pytest.mark.parametrize("line, message", [
    ("bash run.sh generat --prompt x", "run.sh has no subcommand 'generat'"),
    ("bash run.sh generate --promt x", "shows no --promt"),
    (".venv/bin/torchrun --nproc-per-node 2 -m mmdit calibrate --model m", "lists no command 'calibrate'"),
    ("python benchmarks/latency_cpu.py --preset sd3.5-medium", "no file benchmarks/latency_cpu.py"),
    ("OMP_NUM_THREADS=1 python benchmarks/latency.py --preset x --no-such-option", "defines no --no-such-option"),
    ("python -m pytest -q tests/test_nothing.py", "no file tests/test_nothing.py"),
])
def test_a_wrong_command_is_caught(line, message, known):
    found = problems(commands(f"```bash\n{line}\n```\n")[0], known)
    assert len(found) == 1 and message in found[0]


# ---- links between the pages --------------------------------------------------------------

def slugs(text: str) -> set[str]:
    """GitHub's anchors of a markdown text's headings (fenced blocks left out)."""
    text = re.sub(r"^([ \t]*)```.*?^\1```", "", text, flags=re.S | re.M)
    titles = re.findall(r"^#{1,6} (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", t.strip().lower()).replace(" ", "-") for t in titles}


def test_relative_links_point_to_files_and_headings():
    wrong, checked = [], 0
    for doc in DOCUMENTS:
        text = re.sub(r"^([ \t]*)```.*?^\1```", "", doc.read_text(), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if "://" in target:
                continue
            checked += 1
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path) if path else doc
            if not dest.exists():
                wrong.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and anchor not in slugs(dest.read_text()):
                wrong.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert wrong == []
    assert checked >= 40  # the links and images of the pages (about 60 today)


def test_the_repository_stands_alone():
    """No file points to design notes that live outside the repository; docs/architecture.md
    holds what the code relies on."""
    outside = re.compile(r"REFERENCE\.md|PAPER\.md|DESIGN\.md|\.\./shared")
    files = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("build", "__pycache__")]
        files += [Path(folder, n) for n in names if n.endswith((".py", ".md", ".sh"))]
    assert [str(p.relative_to(ROOT)) for p in files if outside.search(p.read_text(errors="replace"))] == []
    assert (ROOT / "docs" / "architecture.md").is_file()
