"""Massive activations (MAs): the disruption spec, a probe, calibration and a per-checkpoint cache.

The probe records the residual stream at the OUTPUT of every block (after its last gated
residual add, where the disruption acts; docs/architecture.md, "Massive activations") with forward
hooks; calibration flags channels far above the median channel and returns an MASpec.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class MASpec:
    """Which residual-stream channels to disrupt, where, and how much.

    channels: MA channel indices of the hidden state (K,).
    block: 0-based global block index m; the disruption acts on the OUTPUT of block m
        (FLUX: double blocks 0..18, then single blocks 19..56).
    rho: factor for those channels (0 zeroes them); a number or a function of sigma.
    streams: which tokens are touched; ("image",) by default, ("image", "text") for both.
    token_mask: optional (N_image,) bool; only those image tokens are disrupted (local DG).

    Frozen: ``model.ma = spec`` checks it against the model and puts its tables on the
    model's device once; change it with ``model.ma = dataclasses.replace(model.ma, rho=0.5)``.
    """

    channels: tuple[int, ...]
    block: int
    rho: float | Callable[[torch.Tensor], torch.Tensor] = 0.0
    streams: tuple[str, ...] = ("image",)
    token_mask: torch.Tensor | None = None

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "streams", tuple(self.streams))
        bad = set(self.streams) - {"image", "text"}
        if bad or not self.streams:
            raise ValueError(f"streams must be a non-empty subset of ('image', 'text'), got {self.streams}")

    def rho_for(self, sigma: torch.Tensor) -> float | torch.Tensor:
        """The factor for rows at noise levels ``sigma`` (n,): a number, or (n,) from a
        callable rho (computed on the device: no host sync)."""
        if not callable(self.rho):
            return float(self.rho)
        value = self.rho(sigma)
        return value.float().expand(sigma.shape[0]) if torch.is_tensor(value) else float(value)


# ---------------------------------------------------------------------------------------------
# Where the hooks go

def default_block(config) -> int:
    """The fork block m when none is given: FLUX block 28 of 57 (single block 9), SD3 the
    middle joint block (12 of 24); scaled to the model's depth (our choice: docs/architecture.md)."""
    total = config.total_blocks
    m = (28 * total) // 57 if config.family == "flux" else total // 2
    return min(max(m, 0), total - 1)


def blocks(model: nn.Module) -> list[tuple[int, str, nn.Module]]:
    """(global index, kind, module) for every block: "joint" (SD3), "double" / "single" (FLUX)."""
    if model.config.family == "sd3":
        return [(i, "joint", b) for i, b in enumerate(model.joint_blocks)]
    n = len(model.double_blocks)
    return ([(i, "double", b) for i, b in enumerate(model.double_blocks)]
            + [(n + j, "single", b) for j, b in enumerate(model.single_blocks)])


def _streams(kind: str, args, kwargs, out) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(image (B, N, D), text (B, L, D) or None) from a block's output."""
    if kind == "joint":  # (ctx, x); ctx is None after the last block
        return out[1], out[0]
    if kind == "double":  # (img, txt)
        return out
    text_len = kwargs["text_len"] if "text_len" in kwargs else args[4]  # (x, vec, cos, sin, text_len)
    return out[:, text_len:], out[:, :text_len]


def _gate_module(kind: str, block: nn.Module) -> tuple[nn.Module, Callable]:
    """The adaLN module of a block and how to read the image-stream MLP gate (alpha) off it."""
    if kind == "joint":
        n = block.x_block.n_mod
        return block.x_block.adaLN_modulation, lambda out: out.chunk(n, dim=1)[5]  # gate_mlp
    if kind == "double":
        return block.img_mod, lambda out: out[1].gate  # (msa, mlp) modulations
    return block.modulation, lambda out: out[0].gate  # the single block's one gate


# ---------------------------------------------------------------------------------------------
# Probe

@dataclass
class Activations:
    """Residual-stream magnitudes at the output of every block, for one forward call.

    Each tensor is (K blocks, B rows, D channels), float32, on the CPU:
    image_mean / image_max: mean and max over image tokens of |h|; image_signed: mean of h.
    text_mean / text_max: the same over text tokens (NaN where a block has no text output).
    gate: the adaLN gate alpha of the image stream's MLP residual (FLUX single: the block's gate).
    sigma: (B,) the rows' noise levels.
    """

    image_mean: torch.Tensor
    image_max: torch.Tensor
    image_signed: torch.Tensor
    text_mean: torch.Tensor
    text_max: torch.Tensor
    gate: torch.Tensor
    sigma: torch.Tensor

    def rows(self, index) -> Activations:
        """The same record for a subset of rows (a slice, a mask or indices)."""
        pick = {f: getattr(self, f)[:, index] for f in ("image_mean", "image_max", "image_signed",
                                                         "text_mean", "text_max", "gate")}
        return Activations(**pick, sigma=self.sigma[index])


class Probe:
    """Forward hooks recording per block, per stream, per channel |h| statistics.

    ``with Probe(model) as probe: model(...)`` appends one ``Activations`` per forward call
    to ``probe.records``. Calls with ``fork`` are not supported (blocks after m have more rows).
    """

    def __init__(self, model: nn.Module):
        self.model, self.records, self._handles = model, [], []
        self._blocks = blocks(model)
        self._current: dict | None = None

    def __enter__(self) -> Probe:
        self._handles.append(self.model.register_forward_pre_hook(self._start, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._finish))
        for k, kind, block in self._blocks:
            self._handles.append(block.register_forward_hook(self._on_block(k, kind), with_kwargs=True))
            module, read = _gate_module(kind, block)
            self._handles.append(module.register_forward_hook(self._on_gate(k, read)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _start(self, module, args, kwargs):
        if kwargs.get("fork") is not None:
            raise ValueError("the MA probe records plain or `disrupt` calls; `fork` changes the row count")
        x = args[0] if args else kwargs["x"]
        sigma = args[1] if len(args) > 1 else kwargs["sigma"]
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        self._current = {"sigma": sigma.detach().cpu().clone(), "blocks": {}, "gates": {}}

    def _on_block(self, k: int, kind: str):
        def hook(module, args, kwargs, out):
            img, txt = _streams(kind, args, kwargs, out)
            a = img.detach().float().abs()
            stats = [a.mean(1), a.amax(1), img.detach().float().mean(1)]
            if txt is None:
                nan = torch.full_like(stats[0], float("nan"))
                stats += [nan, nan]
            else:
                t = txt.detach().float().abs()
                stats += [t.mean(1), t.amax(1)]
            self._current["blocks"][k] = [s.cpu() for s in stats]
        return hook

    def _on_gate(self, k: int, read: Callable):
        def hook(module, args, out):
            self._current["gates"][k] = read(out).detach().float().cpu()
        return hook

    def _finish(self, module, args, out):
        cur, K = self._current, len(self._blocks)
        per = [torch.stack([cur["blocks"][k][i] for k in range(K)]) for i in range(5)]
        gate = torch.stack([cur["gates"][k] for k in range(K)])
        self.records.append(Activations(*per, gate=gate, sigma=cur["sigma"]))
        self._current = None


def _unpack(sample) -> tuple:
    """(x, sigma, context, pooled[, guidance]) -> five values, sigma as a (B,) tensor."""
    if len(sample) not in (4, 5):
        raise ValueError(f"a sample is (x, sigma, context, pooled[, guidance]); got {len(sample)} values")
    x, sigma, context, pooled, *rest = sample
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
    return x, sigma, context, pooled, (rest[0] if rest else None)


@torch.no_grad()
def probe(model: nn.Module, x, sigma, context, pooled, guidance=None, disrupt=None) -> Activations:
    """One forward call of ``model`` with the probe attached."""
    with Probe(model) as p:
        model(x, sigma, context, pooled, guidance=guidance, disrupt=disrupt)
    return p.records[0]


# ---------------------------------------------------------------------------------------------
# The channels the paper reports

# MA channels reported by the paper and its authors' code for the official checkpoints, at
# the default fork block. Hints: ``Pipeline.ensure_ma`` checks them on the checkpoint first.
PAPER_CHANNELS: dict[str, tuple[int, ...]] = {
    "sd3-medium": (810,),
    "sd3.5-medium": (676,),
    "sd3.5-large": (676,),
    "flux.1-dev": (154, 1446),
}


def paper_channels(config) -> tuple[int, ...] | None:
    """The reported MA channels for a model whose config is an official preset's, else None."""
    from .config import PRESETS

    for name, channels in PAPER_CHANNELS.items():
        if PRESETS[name] == config:
            return channels
    return None


@torch.no_grad()
def channel_ratios(model: nn.Module, sample, channels: Sequence[int], block: int) -> list[float]:
    """One forward: each channel's mean |h| over image tokens at the output of ``block``, over
    the block's median channel (the ``select_massive`` statistic). sample: (x, sigma, context,
    pooled[, guidance])."""
    x, sigma, context, pooled, guidance = _unpack(sample)
    mag = probe(model, x, sigma, context, pooled, guidance).image_mean[block].mean(0)  # (D,)
    median = mag.median().clamp_min(1e-12)
    return [(mag[c] / median).item() for c in channels]


# ---------------------------------------------------------------------------------------------
# Calibration

@dataclass
class BlockMA:
    """The MA channels found at one block, strongest first, with the numbers behind them."""

    block: int
    channels: list[int]
    magnitude: list[float]  # mean |h| over image tokens, averaged over the samples
    ratio: list[float]  # magnitude / median channel magnitude of this block
    median: float


@dataclass
class Calibration:
    """What ``find_massive`` found: the spec to use and the per-block table behind it."""

    spec: MASpec
    blocks: list[BlockMA]
    rule: dict  # ratio, absolute, top_k
    samples: int
    magnitude: torch.Tensor = field(repr=False)  # (K, D) mean |h| over image tokens and samples

    def to_json(self) -> dict:
        return {"spec": spec_to_json(self.spec), "rule": self.rule, "samples": self.samples,
                "blocks": [asdict(b) for b in self.blocks]}

    def summary(self) -> str:
        """A per-block table for the terminal (``mmdit calibrate-ma`` prints it)."""
        lines = [f"MA channels by block ({self.samples} rows; rule: {self.rule})", "block  median    channels (x median)"]
        for b in self.blocks:
            found = ", ".join(f"{c} ({r:.0f}x)" for c, r in zip(b.channels, b.ratio)) or "-"
            mark = "  <- fork block m" if b.block == self.spec.block else ""
            lines.append(f"{b.block:5d}  {b.median:8.3g}  {found}{mark}")
        lines.append(f"spec: channels {list(self.spec.channels)}, block {self.spec.block}, rho {self.spec.rho}")
        return "\n".join(lines)


def select_massive(magnitude: torch.Tensor, ratio: float | None = 50.0, absolute: float | None = None,
                   top_k: int | None = 8) -> list[BlockMA]:
    """Flag massive channels per block. magnitude: (K, D), e.g. mean |h| over image tokens.

    Channel c of block k is massive when ``magnitude[k, c] >= ratio * median_c(magnitude[k])``
    (if ratio is set) and ``magnitude[k, c] >= absolute`` (if set). The paper describes MAs
    as ~100x the rest; the default 50 leaves a margin. ``top_k`` caps each block's list.
    """
    if ratio is None and absolute is None:
        raise ValueError("give a ratio-to-median rule, an absolute threshold, or both")
    out = []
    for k, mag in enumerate(magnitude.float()):
        median = mag.median().clamp_min(1e-12)
        ok = torch.ones_like(mag, dtype=torch.bool)
        if ratio is not None:
            ok &= mag >= ratio * median
        if absolute is not None:
            ok &= mag >= absolute
        idx = ok.nonzero().squeeze(1)
        idx = idx[mag[idx].argsort(descending=True)][:top_k]
        out.append(BlockMA(k, idx.tolist(), mag[idx].tolist(), (mag[idx] / median).tolist(), median.item()))
    return out


def massive_block(per_block: Sequence[BlockMA], preferred: int) -> int | None:
    """The fork block when none is given: ``preferred`` (the default block) if it has massive
    channels, else the nearest block that has some (the later one on a tie: the residual stream
    carries a channel forward), else None. A small model may grow its MAs in one block only."""
    flagged = [b.block for b in per_block if b.channels]
    return min(flagged, key=lambda k: (abs(k - preferred), -k)) if flagged else None


@torch.no_grad()
def find_massive(model: nn.Module, samples: Iterable, *, ratio: float | None = 50.0,
                 absolute: float | None = None, top_k: int | None = 8, block: int | None = None,
                 rho: float | Callable = 0.0) -> Calibration:
    """Run ``samples`` through ``model`` with the probe and pick the MA channels of block m.

    samples: iterable of ``(x, sigma, context, pooled[, guidance])`` (all rows count as cond;
        use noisy latents along a sampling trajectory and a few prompts).
    block: the fork block m; the spec's channels are those flagged there by ``select_massive``,
        ranked by magnitude over image tokens. Default: ``default_block``, or the block nearest
        it with massive channels when it has none (``massive_block``).
    """
    m = default_block(model.config) if block is None else block
    if not 0 <= m < model.config.total_blocks:
        raise ValueError(f"block {m} outside 0..{model.config.total_blocks - 1}")
    total, n = None, 0
    with Probe(model) as p:
        for sample in samples:
            x, sigma, context, pooled, guidance = _unpack(sample)
            model(x, sigma, context, pooled, guidance=guidance)
            rec = p.records.pop()
            s = rec.image_mean.sum(1)  # (K, D)
            total, n = (s if total is None else total + s), n + x.shape[0]
    if n == 0:
        raise ValueError("calibration needs at least one sample")
    magnitude = total / n
    per_block = select_massive(magnitude, ratio, absolute, top_k)
    nearest = massive_block(per_block, m) if block is None else None
    m = m if nearest is None else nearest
    if not per_block[m].channels:
        flagged = [b.block for b in per_block if b.channels]
        best = (magnitude[m].max() / magnitude[m].median().clamp_min(1e-12)).item()
        raise ValueError(f"no massive channel at block {m}: its largest channel is {best:.1f}x the median "
                         f"(rule: ratio {ratio}, absolute {absolute}); blocks with MAs: {flagged or 'none'}. "
                         "Pick another --block, relax the rule, or give channels by hand.")
    spec = MASpec(channels=tuple(per_block[m].channels), block=m, rho=rho)
    rule = {"ratio": ratio, "absolute": absolute, "top_k": top_k, "statistic": "mean |h| over image tokens"}
    return Calibration(spec, per_block, rule, n, magnitude)


def calibrate(model: nn.Module, samples: Iterable, *, ratio: float | None = 50.0,
              absolute: float | None = None, top_k: int | None = 8, block: int | None = None,
              rho: float | Callable = 0.0) -> MASpec:
    """The MASpec for ``model`` from ``samples``; see ``find_massive`` for the table behind it."""
    return find_massive(model, samples, ratio=ratio, absolute=absolute, top_k=top_k, block=block,
                        rho=rho).spec


@torch.no_grad()
def ablation_effects(model: nn.Module, sample, channel_sets, block: int, rho: float = 0.0) -> list[float]:
    """Relative change of the output, ``|v_disrupted - v| / |v|`` (norms over the whole batch),
    when each set of ``channels`` of block ``block`` is multiplied by ``rho``: the reviewers'
    control compares MA channels against as many random non-MA channels. v is computed once."""
    x, sigma, context, pooled, guidance = _unpack(sample)
    v = model(x, sigma, context, pooled, guidance=guidance).float()
    rows = slice(0, x.shape[0])  # every row
    saved, effects = model.ma, []
    try:
        for channels in channel_sets:
            model.ma = MASpec(channels=tuple(channels), block=block, rho=rho)
            v_d = model(x, sigma, context, pooled, guidance=guidance, disrupt=rows).float()
            effects.append(((v_d - v).norm() / v.norm().clamp_min(1e-12)).item())
    finally:
        model.ma = saved
    return effects


def ablation_effect(model: nn.Module, sample, channels, block: int, rho: float = 0.0) -> float:
    """``ablation_effects`` for one set of channels."""
    return ablation_effects(model, sample, [channels], block, rho)[0]


# ---------------------------------------------------------------------------------------------
# Cache: one small JSON per checkpoint, keyed by a content hash

FORMAT = "mmdit-ma/1"


def cache_dir() -> Path:
    """``$MMDIT_CACHE/ma`` or ``~/.cache/mmdit/ma``."""
    root = os.environ.get("MMDIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mmdit")
    return Path(root) / "ma"


def checkpoint_hash(source: str | os.PathLike | Sequence[str | os.PathLike], probe_bytes: int = 1 << 16) -> str:
    """sha256 over each weight file's safetensors header, size, and three ``probe_bytes``
    slices of its data (start, middle, end): cheap (no full read), yet a fine-tune with the
    same shapes gets a new key. ``source``: the weight files (a loaded model's
    ``source_files``), or anything ``load_transformer`` accepts, whose files are found the
    same way the loader finds them."""
    if isinstance(source, (str, os.PathLike)):
        from .weights.hub import resolve

        source = resolve(source).open().files
    h = hashlib.sha256()
    for f in source:
        size = os.path.getsize(f)
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= min(size - 8, 100_000_000):
                raise ValueError(f"{f} is not a safetensors file (bad header length)")
            h.update(head + fh.read(n) + str(size).encode())
            start, end = 8 + n, size
            for at in (start, (start + end - probe_bytes) // 2, end - probe_bytes):
                fh.seek(max(start, at))
                h.update(fh.read(probe_bytes))
    return h.hexdigest()


def spec_to_json(spec: MASpec) -> dict:
    if callable(spec.rho):
        raise ValueError("a spec with a callable rho can't be saved; store a number")
    return {"channels": list(spec.channels), "block": spec.block, "rho": float(spec.rho),
            "streams": list(spec.streams)}


def spec_from_json(data: dict) -> MASpec:
    """The inverse of ``spec_to_json``."""
    return MASpec(channels=tuple(data["channels"]), block=data["block"], rho=data["rho"],
                  streams=tuple(data["streams"]))


def save_spec(spec: MASpec, key: str, *, calibration: Calibration | None = None) -> Path:
    """Write the spec (and the calibration table, if given) to ``cache_dir()/<key>.json``."""
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
