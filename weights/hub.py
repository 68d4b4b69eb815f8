"""Where a transformer checkpoint lives: a local file or folder, or a Hugging Face repo.

``resolve`` turns what the user passed into a local path to open. Hub repos are fetched
with ``huggingface_hub.snapshot_download``, transformer files only; ``HF_HUB_OFFLINE=1``
restricts that to the local cache.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import CheckpointError, open_checkpoint, read_json, shard_set
from .families import FAMILIES

DIFFUSERS_STEM = "diffusion_pytorch_model"
TRANSFORMER_FILES = ["transformer/*.json", "transformer/*.safetensors"]  # of a diffusers repo
TRANSFORMER_CLASSES = tuple(c for family in FAMILIES.values() for c in family.DIFFUSERS_CLASSES)
# top-level files of single-file repos that are not the transformer (VAE, text encoders, LoRAs)
NOT_TRANSFORMER = re.compile(r"(^|[/_.-])(ae|vae|clip|clips|t5|t5xxl|text_encoders?|lora)([/_.-]|$)", re.I)
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/.+)?$")


@dataclass(frozen=True)
class Source:
    """A local checkpoint: ``path`` is a .safetensors or .gguf file, an index.json, or a folder."""

    path: Path
    stem: str | None = None  # in a folder: the file stem to open, e.g. "diffusion_pytorch_model"
    config_json: dict | None = None  # the diffusers transformer config, when there is one

    def open(self):
        return open_checkpoint(self.path, self.stem)


def resolve(source: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None) -> Source:
    """A local path (file, index.json, diffusers folder or its ``transformer/``) or a repo id
    (``org/name``, or ``org/name/path/in/repo.safetensors`` for one file of it)."""
    path = Path(source).expanduser()
    if path.exists():
        return _local(path)
    text = str(source)
    looks_like_file = text.count("/") == 1 and text.endswith((".safetensors", ".json", ".ckpt", ".bin", ".pt", ".gguf"))
    if not REPO_ID.match(text) or text.startswith((".", "/", "~")) or looks_like_file:
        raise CheckpointError(f"{text} does not exist (not a file or folder, nor a hub repo id like 'org/name')")
    return _hub(text, revision, token)


def _local(path: Path) -> Source:
    if path.is_file():
        return Source(path, None, _config_json(path.parent) if path.name.startswith(DIFFUSERS_STEM) else None)
    if (path / "transformer").is_dir():
        path = path / "transformer"
    elif (path / "model_index.json").exists():
        raise CheckpointError(f"{path} is a diffusers pipeline folder without a transformer/ subfolder")
    if any(path.glob(f"{DIFFUSERS_STEM}*.safetensors*")):
        return Source(path, DIFFUSERS_STEM, _config_json(path))
    indexes = sorted(path.glob("*.safetensors.index.json"))
    files = sorted(path.glob("*.safetensors"))
    if indexes:
        return Source(indexes[0], None, _config_json(path))
    candidates = [f for f in files if not NOT_TRANSFORMER.search(f.name)] or files
    if len(candidates) == 1:
        return Source(candidates[0], None, _config_json(path))
    if shard_set(candidates) is not None:  # shards without their index.json: opened as one set
        return Source(path, None, _config_json(path))
    if not candidates:
        gguf = sorted(path.glob("*.gguf"))
        if len(gguf) == 1:
            return Source(gguf[0])
        if gguf:
            raise CheckpointError(f"{path} holds several GGUF files {[f.name for f in gguf]}; pass the one you mean")
        raise CheckpointError(f"{path} holds no .safetensors files (found {sorted(p.name for p in path.iterdir())})")
    raise CheckpointError(f"{path} holds several checkpoint files {[f.name for f in candidates]}; "
                          "pass the one you mean")


def _config_json(folder: Path) -> dict | None:
    """The diffusers transformer config in ``folder``, if there is one."""
    cj = read_json(folder / "config.json")
    return cj if cj is not None and cj.get("_class_name") in TRANSFORMER_CLASSES else None


def offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants  # imported where used: `import mmdit` stays light

    env = os.environ.get("HF_HUB_OFFLINE", "")
    return constants.HF_HUB_OFFLINE or env.upper() in {"1", "ON", "YES", "TRUE"}


def cache_dir() -> str:
    """The hub cache as the environment says now (HF_HUB_CACHE, else HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _hub(text: str, revision: str | None, token) -> Source:
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    org, name, *rest = text.split("/", 2)
    repo, filename = f"{org}/{name}", (rest[0] if rest else None)
    where = f"{repo}" + (f" (revision {revision})" if revision else "")
    try:
        if offline():
            folder = _cached_snapshot(repo, revision, token, [filename] if filename else TRANSFORMER_FILES)
        else:
            patterns = [filename] if filename else _patterns(repo, revision, token)
            folder = Path(huggingface_hub.snapshot_download(repo, revision=revision, cache_dir=cache_dir(),
                                                           allow_patterns=patterns, token=token))
    except (hf_errors.LocalEntryNotFoundError, hf_errors.IncompleteSnapshotError) as e:
        how = ("HF_HUB_OFFLINE=1 forbids downloading it. Fix: download it once with network access "
               f"(unset HF_HUB_OFFLINE, or `hf download {repo} --include 'transformer/*'`), "
               "or pass a local path") if offline() else f"the hub could not be reached either ({e})"
        raise CheckpointError(f"{where} is not in the local Hugging Face cache ({cache_dir()}); {how}") from None
    except hf_errors.GatedRepoError:
        raise CheckpointError(f"{where} is gated: accept its license on huggingface.co and pass token= "
                              "(or log in with `hf auth login`)") from None
    except hf_errors.RepositoryNotFoundError:
        raise CheckpointError(f"{text} is neither a local path nor a Hugging Face repo you can access "
                              "(check the name; private repos need token=)") from None
    except hf_errors.RevisionNotFoundError:
        raise CheckpointError(f"{repo} has no revision {revision!r}") from None
    if filename:
        path = folder / filename
        if not path.exists():
            raise CheckpointError(f"{repo} has no file {filename!r} in the local cache ({folder})")
        return Source(path, None, None)
    return _local(folder)


def _cached_snapshot(repo: str, revision: str | None, token, patterns: list[str]) -> Path:
    """The cached snapshot folder. huggingface_hub checks the files matching ``patterns`` against
    its cached listing of the repo, so a repo of which only the transformer was downloaded is
    fine. If the listing names transformer/ files that aren't here (a single-file download from a
    repo that has both), take the folder as it is: the caller looks at what is actually present."""
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    try:
        return Path(huggingface_hub.snapshot_download(repo, revision=revision, cache_dir=cache_dir(),
                                                      local_files_only=True, token=token, allow_patterns=patterns))
    except hf_errors.IncompleteSnapshotError:
        return Path(huggingface_hub.snapshot_download(repo, revision=revision, cache_dir=cache_dir(),
                                                      local_files_only=True, token=token, allow_patterns=[]))


def _patterns(repo: str, revision: str | None, token) -> list[str]:
    """Which files of ``repo`` make up its transformer (listing the repo, downloading nothing)."""
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    try:
        files = huggingface_hub.list_repo_files(repo, revision=revision, token=token)
    except (hf_errors.GatedRepoError, hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError):
        raise
    except Exception:  # no network: let snapshot_download fall back to the cache
        return ["transformer/*"]
    if any(f.startswith("transformer/") for f in files):
        return TRANSFORMER_FILES
    single = [f for f in files if "/" not in f and f.endswith(".safetensors") and not NOT_TRANSFORMER.search(f)]
    if len(single) == 1:
        return single
    gguf = [f for f in files if f.endswith(".gguf")]
    if not single and len(gguf) == 1:
        return gguf
    if not single and gguf:  # a repo of GGUF quantizations: one file each
        shown = ", ".join(gguf[:6]) + ", ..." * (len(gguf) > 6)
        raise CheckpointError(f"{repo} holds {len(gguf)} GGUF files ({shown}); pass one as '{repo}/<file>.gguf'")
    raise CheckpointError(f"{repo} has no transformer/ folder and {len(single)} candidate top-level files "
                          f"{single}; pass one as '{repo}/<file>.safetensors'")
