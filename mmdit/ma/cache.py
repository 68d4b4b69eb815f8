"""The MA spec cache: one small JSON per checkpoint, keyed by a content hash of its files."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from .spec import MASpec, spec_from_json, spec_to_json

FORMAT = "mmdit-ma/1"


def cache_dir() -> Path:
    """``$MMDIT_CACHE/ma`` or ``~/.cache/mmdit/ma``."""
    root = os.environ.get("MMDIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mmdit")
    return Path(root) / "ma"


def checkpoint_hash(source: str | os.PathLike | Sequence[str | os.PathLike], probe_bytes: int = 1 << 16) -> str:
    """sha256 over each weight file's header (safetensors; GGUF's up to its data), size, and three
    ``probe_bytes`` slices of its data (start, middle, end): cheap (no full read), yet a fine-tune with the
    same shapes gets a new key. ``source``: the weight files (a loaded model's
    ``source_files``), or anything ``load_transformer`` accepts, whose files are found the
    same way the loader finds them."""
    if isinstance(source, (str, os.PathLike)):
        from ..weights.hub import resolve

        source = resolve(source).open().files
    h = hashlib.sha256()
    for f in source:
        size = os.path.getsize(f)
        with open(f, "rb") as fh:
            head = fh.read(8)
            if head[:4] == b"GGUF":  # GGUF: its header, metadata and tensor table, up to the data
                from ..weights.gguf import GGUFFile

                start = GGUFFile(f).data_start
                h.update(head + fh.read(start - 8) + str(size).encode())
            else:
                n = int.from_bytes(head, "little") if len(head) == 8 else -1
                if not 0 < n <= min(size - 8, 100_000_000):
                    raise ValueError(f"{f} is not a safetensors file (bad header length)")
                h.update(head + fh.read(n) + str(size).encode())
                start = 8 + n
            end = size
            for at in (start, (start + end - probe_bytes) // 2, end - probe_bytes):
                fh.seek(max(start, at))
                h.update(fh.read(probe_bytes))
    return h.hexdigest()


def save_spec(spec: MASpec, key: str, *, calibration=None) -> Path:
    """Write the spec (and the ``Calibration`` table, if given) to ``cache_dir()/<key>.json``."""
    data = {"format": FORMAT, "key": key, "spec": spec_to_json(spec)}
    if calibration is not None:
        data["calibration"] = calibration.to_json()
    path = cache_dir() / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
    return path


def load_spec(key: str) -> MASpec | None:
    """The cached spec for ``key``, or None if there is none."""
    path = cache_dir() / f"{key}.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path} is not an MA spec of format {FORMAT} (found {data.get('format')!r}); "
                         "delete it and run `mmdit calibrate-ma` again")
    return spec_from_json(data["spec"])


def spec_for_checkpoint(source: str | os.PathLike | Sequence[str | os.PathLike]) -> MASpec | None:
    """The cached MASpec of a checkpoint: its hash, or what ``checkpoint_hash`` takes."""
    text = str(source)
    if len(text) == 64 and all(ch in "0123456789abcdef" for ch in text) and not os.path.exists(text):
        return load_spec(text)
    return load_spec(checkpoint_hash(source))
