"""Open safetensors (and GGUF) checkpoints lazily and stream them into modules built on ``meta``."""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import CheckpointError
from .gguf import GGUFCheckpoint, is_gguf


class Checkpoint(Mapping):
    """name -> tensor over one or more safetensors files, read (mmapped) on access."""

    def __init__(self, files: list[Path], weight_map: dict[str, Path] | None = None):
        self.files = files
        self._handles = {}
        if weight_map is None:
            weight_map = {}
            for f in files:
                for name in self._open(f).keys():
                    weight_map[name] = f
        self._where = weight_map

    def _open(self, path: Path):
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types with terse text
                raise CheckpointError(f"{path} is not a readable safetensors file ({e}). "
                                      "Pass a .safetensors file, its *.index.json, or a folder holding them.") from None
        return self._handles[path]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._open(self._where[name]).get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self._where[name]).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._open(self._where[name]).get_slice(name).get_dtype()

    def metadata(self) -> dict[str, str]:
        return self._open(self.files[0]).metadata() or {}

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def nbytes(self) -> int:
        return sum(os.path.getsize(f) for f in self.files)


def count_indexed(keys, pattern: str) -> int:
    """Blocks in a checkpoint: 1 + the largest n with a key starting with ``pattern.format(n)``
    (e.g. ``"joint_blocks.{}."``), 0 if none."""
    rx = re.compile(re.escape(pattern).replace(r"\{\}", r"(\d+)"))
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def need_key(shapes: Mapping, key: str, where: str, family: str) -> tuple[int, ...]:
    """The shape of ``key``, or one error saying the checkpoint lacks it (a shard, or a variant)."""
    if key not in shapes:
        raise CheckpointError(f"{where} looks like a {family} transformer but has no {key!r} "
                              "(or its diffusers equivalent): it is one shard of a multi-file checkpoint (point at "
                              "the folder or its index.json), or a variant of the architecture this loader does not "
                              "know")
    return shapes[key]


def read_json(path: Path) -> dict | None:
    """The JSON in ``path``; None if there is no such file; one clear error if it is not JSON."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def open_checkpoint(path: str | os.PathLike, stem: str | None = None) -> Checkpoint:
    """A ``.safetensors`` file, a ``*.safetensors.index.json``, a folder holding either, or a
    ``.gguf`` file (``weights.gguf.GGUFCheckpoint``).

    In a folder, ``stem`` (e.g. ``diffusion_pytorch_model``) picks among several files.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_dir():
        indexes = sorted(path.glob(f"{stem or '*'}.safetensors.index.json"))
        if indexes:
            return open_checkpoint(indexes[0])
        files = sorted(path.glob(f"{stem or '*'}.safetensors"))
        if len(files) != 1:
            shards = sorted(path.glob(f"{stem or '*'}-*-of-*.safetensors"))
            if shards:
                return open_shards(path, shards)
            found = [f.name for f in path.iterdir()]
            raise CheckpointError(f"{path} holds {len(files)} candidate .safetensors files "
                                  f"(found {found}); point at one file or its index.json")
        return Checkpoint(files)
    if path.name.endswith(".index.json"):
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{path} is not a safetensors index (no weight_map: {e})") from None
        files = {name: path.parent / shard for name, shard in weight_map.items()}
        missing = sorted({str(f) for f in files.values() if not f.exists()})
        if missing:
            raise CheckpointError(f"{path} lists shards that are missing: {missing}")
        return Checkpoint(sorted(set(files.values())), files)
    if is_gguf(path):
        return GGUFCheckpoint(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path} is not a .safetensors file; only safetensors checkpoints (and GGUF) are "
                              "supported (convert .ckpt/.bin/.pt with safetensors.torch.save_file)")
    return Checkpoint([path])


def open_shards(folder: Path, files: list[Path]) -> Checkpoint:
    """The shards of one ``name-0000i-of-0000n.safetensors`` set without an index.json: opened
    together if the set is complete, else one error naming the missing shard files."""
    found = shard_set(files)
    if found is None:
        raise CheckpointError(f"{folder} holds several .safetensors files that are not one shard set "
                              f"({[f.name for f in files]}); point at one file or the index.json")
    shards, missing = found
    if missing:
        raise CheckpointError(f"{folder} holds {len(shards)} shard(s) of a set without its index.json, and "
                              f"these shard files are missing: {missing}")
    return Checkpoint(shards)


def shard_set(files: list[Path]) -> tuple[list[Path], list[str]] | None:
    """``name-00001-of-00003.safetensors``-style files: (the shards found, the names missing),
    or None if ``files`` are not the shards of one set."""
    rx = re.compile(r"^(?P<stem>.+)-(?P<i>\d+)-of-(?P<n>\d+)\.safetensors$")
    hits = [(f, rx.match(f.name)) for f in files]
    if not hits or not all(m for _, m in hits):
        return None
    sets = {(m["stem"], m["n"]) for _, m in hits}
    if len(sets) != 1:
        return None
    (stem, n), = sets
    width = len(n)
    have = {int(m["i"]) for _, m in hits}
    missing = [f"{stem}-{i:0{width}d}-of-{n}.safetensors" for i in range(1, int(n) + 1) if i not in have]
    return sorted(f for f, _ in hits), missing


def load_into(module: torch.nn.Module, tensors: Mapping[str, Callable[[], torch.Tensor]],
              shapes: Mapping[str, tuple[int, ...]], *, dtype: torch.dtype | Callable[[str], torch.dtype],
              device, layout: str) -> None:
    """Assign every parameter and persistent buffer of ``module`` (built on meta) strictly.

    ``tensors`` maps each of the module's names to a thunk producing the tensor, ``shapes``
    to its shape (checked before anything is read). Missing, unexpected or mis-shaped
    keys raise one error naming them and ``layout``; nothing is assigned in that case.
    Floating tensors are cast to ``dtype``, or to ``dtype(name)`` if it is a function.
    """
    own = dict(module.state_dict(keep_vars=True))
    problems = mismatches({k: v.shape for k, v in own.items()}, {k: shapes[k] for k in tensors})
    if problems:
        raise CheckpointError("\n  ".join([f"checkpoint does not match the model (detected layout: {layout})",
                                            *problems]))
    for name, make in tensors.items():
        t = make()
        if t.dtype.is_floating_point:
            # float8 checkpoints are upcast here, one tensor at a time
            t = t.to(dtype=dtype(name) if callable(dtype) else dtype)
        _assign(module, name, t.to(device), own[name])


def _assign(module: torch.nn.Module, name: str, value: torch.Tensor, old) -> None:
    *path, leaf = name.split(".")
    owner = module.get_submodule(".".join(path)) if path else module
    if isinstance(old, torch.nn.Parameter):
        setattr(owner, leaf, torch.nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        owner.register_buffer(leaf, value, persistent=True)


def mismatches(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]) -> list[str]:
    """At most two lines naming the missing and unexpected keys, then the mis-shaped ones (with
    shapes, the first few of each); [] if none."""
    expected = {k: tuple(v) for k, v in expected.items()}
    found = {k: tuple(v) for k, v in found.items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [(k, expected[k], found[k]) for k in sorted(set(expected) & set(found)) if expected[k] != found[k]]
    keys = []
    if missing:
        keys.append(f"missing {len(missing)} key(s): " + _listing(missing, expected))
    if unexpected:
        keys.append(f"unexpected {len(unexpected)} key(s): " + _listing(unexpected, found))
    lines = ["; ".join(keys)] if keys else []
    if wrong:
        more = f" (+{len(wrong) - 3} more)" if len(wrong) > 3 else ""
        lines.append("; ".join(f"shape mismatch for {k}: model expects {want}, checkpoint has {got}"
                               for k, want, got in wrong[:3]) + more)
    return lines


def _listing(keys: list[str], shapes: Mapping[str, tuple[int, ...]], n: int = 4) -> str:
    shown = ", ".join(f"{k} {shapes[k]}" for k in keys[:n])
    return shown + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")
