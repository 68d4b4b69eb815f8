"""Writing results so that no reader sees a part of a file, and ending a benchmark on Ctrl-C with
one line. No torch here: the GPU check's driver imports this alone.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path


@contextlib.contextmanager
def atomic(path):
    """A temporary name beside ``path`` to write to, renamed to ``path`` at the end and removed on an
    error or Ctrl-C: ``path`` is the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path, out: dict) -> None:
    """The result dict as indented JSON at ``path`` (folders created), written atomically."""
    with atomic(path) as tmp:
        tmp.write_text(json.dumps(out, indent=2) + "\n")


INTERRUPTED = 130  # the shell's status for a process ended by SIGINT (128 + 2)


def run_main(main, *args) -> None:
    """A benchmark's ``__main__``: exits with ``main``'s return value; on Ctrl-C one line on stderr
    and status 130 (results are written atomically, so no partial file is left)."""
    try:
        status = main(*args)
    except KeyboardInterrupt:
        print(f"{Path(sys.argv[0]).name}: interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        sys.exit(INTERRUPTED)
    sys.exit(status if isinstance(status, int) else 0)
