"""A non-editable install carries every module: each source folder is a package setup.py lists."""
from __future__ import annotations

import ast
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPORT_ROOTS = {"mmdit": "mmdit", "kernels": "mmdit.kernels", "weights": "mmdit.weights", "samplers": "mmdit.samplers"}


def listed_packages() -> set[str]:
    """setup.py's ``packages=``, evaluated with its own ``tree`` helper (setup() itself is not run)."""
    source = (ROOT / "setup.py").read_text()
    head = source.split("setup(")[0]
    namespace: dict = {}
    exec(compile(head, "setup.py", "exec"), namespace)
    call = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    packages = next(k.value for k in call.keywords if k.arg == "packages")
    cwd = Path.cwd()
    try:
        os.chdir(ROOT)
        return set(eval(compile(ast.Expression(packages), "setup.py", "eval"), namespace))
    finally:
        os.chdir(cwd)


def test_every_folder_of_python_source_is_an_installed_package():
    expected = set()
    for folder, name in IMPORT_ROOTS.items():
        for init_dir in {p.parent for p in (ROOT / folder).rglob("*.py")}:
            if "__pycache__" in init_dir.parts:
                continue
            assert (init_dir / "__init__.py").exists(), f"{init_dir.relative_to(ROOT)} has modules but no __init__.py"
            expected.add(".".join([name, *init_dir.relative_to(ROOT / folder).parts]))
    assert listed_packages() == expected
