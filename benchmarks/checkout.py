"""``import mmdit`` from this checkout without the checkout's root on ``sys.path``.

The root holds kernels/, which would shadow PyPI's ``kernels`` package (transformers >= 5.25
imports it), so the root itself never goes on the path. Instead a folder holding one link, named
``mmdit``, to the checkout's mmdit/ goes first on it; mmdit/__init__.py finds kernels/, weights/
and samplers/ beside the link's target (setup.py's ``package_dir`` in an install). No torch here.
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def import_folder() -> Path:
    """The folder with the ``mmdit`` link (made once per checkout, in the temporary directory), put
    first on ``sys.path``; a child process sees this checkout's mmdit with it on PYTHONPATH."""
    folder = Path(tempfile.gettempdir()) / f"mmdit-import-{hashlib.sha1(str(ROOT).encode()).hexdigest()[:10]}"
    link = folder / "mmdit"
    if not (link.is_symlink() and link.resolve() == ROOT / "mmdit"):
        folder.mkdir(exist_ok=True)
        tmp = folder / f".mmdit.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(ROOT / "mmdit", target_is_directory=True)
        os.replace(tmp, link)  # atomic: processes starting side by side all see a whole link
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return folder
