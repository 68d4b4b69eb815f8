"""Shared pieces of the benchmarks: configs, our model with random weights or the diffusers peer
with our weights, inputs, FLOP counts, device facts, atomic JSON, Ctrl-C.

diffusers is a benchmark-only peer: it is imported here (on first use), never by the library.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import importlib.metadata
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import checkout  # noqa: E402
checkout.import_folder()  # this checkout's mmdit, its root kept off sys.path (kernels/)

import mmdit  # noqa: E402
from results import INTERRUPTED, atomic, run_main, write_json  # noqa: E402,F401  (for every benchmark)
from mmdit.models import flux, flux2  # noqa: E402
from mmdit.models.config import ChromaConfig, Flux2Config, FluxConfig, QwenImageConfig, SD3Config  # noqa: E402
from mmdit.samplers import default_layers  # noqa: E402

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
# Reported MA channels (docs/architecture.md); used modulo the hidden size for narrower test configs.
MA_HINTS = {1536: (810, 676), 2432: (676,), 3072: (154, 1446)}
# Dense (no sparsity) peak throughput from the vendors' datasheets in TFLOP/s, by a substring of
# the device name (first match) and dtype. A device not listed gets MFU against the measured matmul only.
PEAK_TFLOPS = [
    ("H200", {torch.bfloat16: 989.4, torch.float16: 989.4, torch.float32: 66.9}),
    ("H100 PCIe", {torch.bfloat16: 756.0, torch.float16: 756.0, torch.float32: 51.2}),
    ("H100", {torch.bfloat16: 989.4, torch.float16: 989.4, torch.float32: 66.9}),  # SXM
    ("A100", {torch.bfloat16: 312.0, torch.float16: 312.0, torch.float32: 19.5}),
    ("L40S", {torch.bfloat16: 362.1, torch.float16: 362.1, torch.float32: 91.6}),
    ("RTX 4090", {torch.bfloat16: 165.2, torch.float16: 165.2, torch.float32: 82.6}),
]


# ---- command line -------------------------------------------------------------------------

def add_model_args(p: argparse.ArgumentParser, preset: str = "sd3.5-medium") -> None:
    p.add_argument("--preset", default=preset, help=f"one of {sorted(mmdit.PRESETS)} (default {preset})")
    p.add_argument("--num-layers", type=int, default=None,
                   help="blocks to keep (full depth by default; FLUX: the total, split like the original)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any config field, e.g. --set num_heads=2 --set head_dim=16 (repeatable)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-len", type=int, default=None,
                   help="text tokens (default: 333 for SD3 = 77 CLIP + 256 T5, 512 for FLUX-dev, 128 for "
                        "Qwen-Image: its prompts are padded to the longest of the batch only)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")


def slg_layers(total: int, text: str | None = None) -> tuple[int, ...]:
    """The blocks SLG skips: ``text`` ("7,8,9"), else the library's default (``samplers.default_layers``)."""
    if text is not None:
        return tuple(int(i) for i in text.split(","))
    return default_layers("slg", total)


def text_len(args, config) -> int:
    """--text-len, or the family's usual length."""
    return args.text_len or {"sd3": 333, "qwen-image": 128}.get(config.family, 512)


def config_from_args(args) -> SD3Config | FluxConfig | Flux2Config | QwenImageConfig:
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    if args.num_layers is not None:
        overrides["num_layers"] = args.num_layers
    return mmdit.preset(args.preset, **overrides)


def config_dict(config) -> dict:
    return {"family": config.family, **dataclasses.asdict(config)}


# ---- our model alone, the diffusers peer and our model with the same weights ---------------

def build_ours(config, device, dtype, seed: int = 0) -> torch.nn.Module:
    """Our transformer for ``config`` with random weights, built on ``device`` in ``dtype`` (no
    fp32 copy first: FLUX.2-dev is 128 GB in fp32)."""
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = mmdit.build_transformer(config, device=device, dtype=dtype)
    finally:
        torch.set_default_dtype(default)
    return model.eval().requires_grad_(False)


def peer_kwargs(config) -> dict:
    """diffusers constructor arguments for one of our configs (docs/architecture.md, configurations)."""
    if isinstance(config, SD3Config):
        return dict(sample_size=128, patch_size=config.patch_size, in_channels=config.in_channels,
                    out_channels=config.out_channels, num_layers=config.num_layers,
                    attention_head_dim=config.head_dim, num_attention_heads=config.num_heads,
                    joint_attention_dim=config.context_dim, caption_projection_dim=config.hidden_size,
                    pooled_projection_dim=config.pooled_dim, pos_embed_max_size=config.pos_embed_max_size,
                    dual_attention_layers=config.dual_attention_layers,
                    qk_norm="rms_norm" if config.qk_norm else None)
    if isinstance(config, Flux2Config):
        return dict(patch_size=1, in_channels=config.in_channels, num_layers=config.num_double,
                    num_single_layers=config.num_single, attention_head_dim=config.head_dim,
                    num_attention_heads=config.num_heads, joint_attention_dim=config.context_dim,
                    mlp_ratio=config.mlp_ratio, axes_dims_rope=config.axes_dim, rope_theta=config.theta,
                    guidance_embeds=config.guidance_embed)
    if isinstance(config, QwenImageConfig):
        return dict(patch_size=2, in_channels=config.in_channels, out_channels=config.out_channels,
                    num_layers=config.num_layers, attention_head_dim=config.head_dim,
                    num_attention_heads=config.num_heads, joint_attention_dim=config.context_dim,
                    guidance_embeds=False, axes_dims_rope=config.axes_dim)
    if isinstance(config, ChromaConfig):
        return dict(patch_size=1, in_channels=config.in_channels, num_layers=config.num_double,
                    num_single_layers=config.num_single, attention_head_dim=config.head_dim,
                    num_attention_heads=config.num_heads, joint_attention_dim=config.context_dim,
                    axes_dims_rope=config.axes_dim, approximator_num_channels=config.approximator_in,
                    approximator_hidden_dim=config.approximator_hidden, approximator_layers=config.approximator_layers)
    return dict(patch_size=1, in_channels=config.in_channels, num_layers=config.num_double,
                num_single_layers=config.num_single, attention_head_dim=config.head_dim,
                num_attention_heads=config.num_heads, joint_attention_dim=config.context_dim,
                pooled_projection_dim=config.pooled_dim, guidance_embeds=config.guidance_embed,
                axes_dims_rope=config.axes_dim)


def build_peer(config, device, dtype, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised diffusers transformer for ``config``, built on ``device``."""
    from diffusers import (ChromaTransformer2DModel, Flux2Transformer2DModel, FluxTransformer2DModel,
                           QwenImageTransformer2DModel, SD3Transformer2DModel)
    from diffusers.utils import logging

    logging.set_verbosity_error()  # its note on casting with .to() is about fp16 checkpoints
    cls = {SD3Config: SD3Transformer2DModel, FluxConfig: FluxTransformer2DModel, Flux2Config: Flux2Transformer2DModel,
           QwenImageConfig: QwenImageTransformer2DModel, ChromaConfig: ChromaTransformer2DModel}[type(config)]
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: full-size FLUX is 48 GB in fp32
    try:
        with torch.device(device):
            peer = cls(**peer_kwargs(config))
    finally:
        torch.set_default_dtype(default)
    return peer.to(dtype=dtype).eval().requires_grad_(False)


def ours_from_peer(peer: torch.nn.Module, config) -> torch.nn.Module:
    """Our transformer holding the peer's weights (shared storage where the layouts agree)."""
    from mmdit.weights import keymaps

    sd = keymaps.from_diffusers(peer.state_dict(), config.family, config.hidden_size)
    model = mmdit.build_transformer(config, device="meta")
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def ma_channels(config) -> tuple[int, ...]:
    D = config.hidden_size
    return tuple(sorted({c % D for c in MA_HINTS.get(D, (810, 676))}))


# ---- inputs and the peer in our call convention --------------------------------------------

@dataclasses.dataclass
class Inputs:
    x: torch.Tensor  # (B, 16, h, w) latents; FLUX.2: (B, 128, h/2, w/2), the patchified grid
    sigma: torch.Tensor  # (B,)
    context: torch.Tensor  # (B, L, context_dim)
    pooled: torch.Tensor | None  # (B, pooled_dim); None for FLUX.2, Qwen-Image and Chroma
    guidance: torch.Tensor | None  # (B,) for FLUX-dev and FLUX.2 [dev]
    mask: torch.Tensor | None = None  # (B, L) bool, Chroma's text mask

    def repeat(self, n: int) -> "Inputs":
        """n copies of the rows, e.g. [uncond | cond] (the prompts' content doesn't matter here)."""
        def r(t):
            return None if t is None else torch.cat([t] * n)
        return Inputs(r(self.x), r(self.sigma), r(self.context), r(self.pooled), r(self.guidance), r(self.mask))


def make_inputs(config, batch: int, latent_hw: tuple[int, int], text_len: int, device, dtype,
                seed: int = 1) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    h, w = latent_hw
    if isinstance(config, Flux2Config):  # the 2x2-patchified grid, one token per position
        C, h, w = config.in_channels, h // 2, w // 2
    else:
        C = config.in_channels if isinstance(config, SD3Config) else config.latent_channels

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
    guidance = None
    if getattr(config, "guidance_embed", False):
        guidance = torch.full((batch,), 3.5, device=device, dtype=dtype)
    sigma = torch.rand(batch, generator=g).to(device)
    x, context = randn(batch, C, h, w), randn(batch, text_len, config.context_dim)
    if isinstance(config, ChromaConfig):  # T5 only; the mask keeps a quarter of the window (a ~125-token prompt)
        mask = (torch.arange(text_len, device=device) < max(1, text_len // 4)).expand(batch, -1)
        return Inputs(x, sigma, context, None, None, mask)
    pooled = randn(batch, config.pooled_dim) if hasattr(config, "pooled_dim") else None
    return Inputs(x, sigma, context, pooled, guidance)


def call_ours(model, inp: Inputs, **kw) -> torch.Tensor:
    """Our model on ``inp``: x, sigma, context, then pooled and guidance where the family has them
    (Chroma: its text mask)."""
    args = (inp.x, inp.sigma, inp.context) + (() if inp.pooled is None else (inp.pooled,))
    args = args if inp.guidance is None else (*args, inp.guidance)
    return model(*args, **({} if inp.mask is None else {"context_mask": inp.mask}), **kw)


class PeerRunner:
    """Calls the diffusers model the way its pipelines do, in our convention (B, C, H, W) -> same.

    FLUX: packing and the position ids are prepared once per input shape (as a pipeline does
    once per generation) and are not part of a timed call; unpacking the output is. Qwen-Image
    the same (its ``img_shapes``; no text mask: one prompt has no padding).
    """

    def __init__(self, peer, config):
        self.peer, self.config = peer, config
        self.flux = isinstance(config, (FluxConfig, Flux2Config, ChromaConfig))  # position ids, no skip_layers
        self.flux2 = isinstance(config, Flux2Config)
        self.qwen = isinstance(config, QwenImageConfig)
        self._ids = {}
        self.hook = None  # the DG hook's handle (see build_cases)

    def prepare(self, inp: Inputs) -> dict:
        if self.qwen:
            B, C, H, W = inp.x.shape
            return dict(hidden_states=flux.pack(inp.x), encoder_hidden_states=inp.context,
                        timestep=inp.sigma.to(inp.x.dtype), img_shapes=[[(1, H // 2, W // 2)]] * B)
        if not self.flux:
            # SD3 pipelines pass the scheduler's fp32 timesteps; FLUX ones cast sigma to the latents' dtype
            return dict(hidden_states=inp.x, encoder_hidden_states=inp.context,
                        pooled_projections=inp.pooled, timestep=1000 * inp.sigma)
        B, C, H, W = inp.x.shape
        if self.flux2:  # one token per grid position, 4-axis ids
            key = (H, W, inp.context.shape[1])
            if key not in self._ids:
                self._ids[key] = (flux2.grid_ids(H, W, inp.x.device), flux2.text_ids(key[2], inp.x.device))
            img_ids, txt_ids = self._ids[key]
            return dict(hidden_states=inp.x.flatten(2).transpose(1, 2), encoder_hidden_states=inp.context,
                        timestep=inp.sigma.to(inp.x.dtype), img_ids=img_ids, txt_ids=txt_ids, guidance=inp.guidance)
        h, w = H // 2, W // 2
        packed = flux.pack(inp.x)
        key = (h, w, inp.context.shape[1])
        if key not in self._ids:
            dev = inp.x.device
            self._ids[key] = (flux.image_ids(h, w, dev), torch.zeros(inp.context.shape[1], 3, device=dev))
        img_ids, txt_ids = self._ids[key]
        if inp.mask is not None:  # Chroma: the text mask as its transformer takes it, (B, L + N) bool
            mask = torch.cat([inp.mask, inp.mask.new_ones(B, h * w)], dim=1)
            return dict(hidden_states=packed, encoder_hidden_states=inp.context, timestep=inp.sigma.to(inp.x.dtype),
                        img_ids=img_ids, txt_ids=txt_ids, attention_mask=mask)
        return dict(hidden_states=packed, encoder_hidden_states=inp.context, pooled_projections=inp.pooled,
                    timestep=inp.sigma.to(inp.x.dtype), img_ids=img_ids, txt_ids=txt_ids,
                    guidance=inp.guidance)

    def __call__(self, prepared: dict, shape, **extra) -> torch.Tensor:
        out = self.peer(**prepared, **extra, return_dict=False)[0]
        if not (self.flux or self.qwen):
            return out
        B, C, H, W = shape
        B = out.shape[0]
        if self.flux2:
            return out.transpose(1, 2).reshape(B, C, H, W)
        return out.view(B, H // 2, W // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)

    def block(self, m: int) -> torch.nn.Module:
        """The peer's block with global index m (FLUX: double blocks, then single blocks)."""
        if self.flux and m >= self.config.num_double:
            return self.peer.single_transformer_blocks[m - self.config.num_double]
        return self.peer.transformer_blocks[m]


def zero_ma_hook(batch: int, channels: torch.Tensor, text_len: int = 0):
    """A forward hook zeroing ``channels`` of the image tokens of the last ``batch`` rows at a
    block's output, in calls of 3 * batch rows ([uncond | cond | cond to disrupt]) only.

    It stays registered: the batch size, not Python state, switches it on, so a compiled peer
    sees the same hook in every call (dynamo does not notice submodule hooks added later).
    Every diffusers SD3 / FLUX / Qwen-Image block (joint, double, single) and FLUX.2 double block
    returns (context, image); a FLUX.2 or Chroma single block returns [text ; image] as one tensor
    (``text_len`` text tokens first).
    """
    def hook(module, args, output):
        image, start = (output[1], 0) if isinstance(output, tuple) else (output, text_len)
        if image.shape[0] == 3 * batch:
            image[2 * batch:, start:, channels] = 0
        return output
    return hook


# ---- FLOPs ---------------------------------------------------------------------------------

def forward_flops(config, n_img: int, n_txt: int, batch: int, fork_block: int | None = None,
                  n_fork: int = 0, branches: tuple = (), skipped: tuple = ()) -> int:
    """Multiply-adds x 2 of one forward: every matmul plus attention (QK^T and PV).

    With a fork at block m, blocks <= m run on ``batch`` rows and the rest (and the final
    layer) on ``batch + n_fork``. ``branches``: more (rows, first block, skipped blocks) copies,
    e.g. SLG's; ``skipped``: blocks the ``batch`` rows skip. Elementwise work (norms, gates,
    GELU, RoPE) is left out.
    """
    if fork_block is not None:
        branches = ((n_fork, fork_block + 1, ()), *branches)
    D = config.hidden_size
    F = int(D * config.mlp_ratio)
    N, T = n_img, n_txt

    def rows(i):  # rows running block i (i = total_blocks: the final layer)
        base = 0 if i in skipped else batch
        return base + sum(n for n, first, skip in branches if i >= first and i not in skip)

    def attn(q_len, k_len):
        return 4 * q_len * k_len * D  # QK^T and PV over all heads

    total = 0
    if isinstance(config, Flux2Config):  # no biases, modulations once per call, SwiGLU (2F in, F out)
        total += 2 * batch * (N * config.in_channels * D + T * config.context_dim * D
                              + (256 * D + D * D) * (2 if config.guidance_embed else 1) + 15 * D * D)
        L = N + T
        for i in range(config.num_double):
            total += rows(i) * (2 * L * (4 * D * D + 3 * F * D) + attn(L, L))
        for j in range(config.num_single):
            total += rows(config.num_double + j) * (2 * L * (D * (3 * D + 2 * F) + (D + F) * D) + attn(L, L))
        return total + 2 * rows(config.total_blocks) * (2 * D * D + N * D * config.in_channels)
    if isinstance(config, QwenImageConfig):  # double-stream blocks only, 2x2-packed input and output
        total += 2 * batch * (N * config.in_channels * D + T * config.context_dim * D + 256 * D + D * D)
        for i in range(config.num_layers):
            per = 2 * 6 * D * D + (N + T) * (3 * D * D + D * D + 2 * D * F)  # both streams' mods, qkv, out, MLP
            total += rows(i) * (2 * per + attn(N + T, N + T))
        total += 2 * rows(config.num_layers) * (2 * D * D + N * D * 4 * config.out_channels)
        return total
    if isinstance(config, SD3Config):
        p = config.patch_size
        head = N * config.in_channels * p * p * D + T * config.context_dim * D
        head += 256 * D + D * D + config.pooled_dim * D + D * D
        total += 2 * batch * head
        for i in range(config.num_layers):
            last = i == config.num_layers - 1
            dual = i in config.dual_attention_layers
            x = (9 if dual else 6) * D * D + N * (3 * D * D + D * D + 2 * D * F)
            x += N * 4 * D * D if dual else 0  # attn2: its own qkv + proj
            c = (2 if last else 6) * D * D + T * 3 * D * D + (0 if last else T * (D * D + 2 * D * F))
            a = attn(N + T, N + T) + (attn(N, N) if dual else 0)
            total += rows(i) * (2 * (x + c) + a)
        final = 2 * D * D + N * D * p * p * config.out_channels
        total += 2 * rows(config.num_layers) * final
        return total
    head = N * config.in_channels * D + T * config.context_dim * D
    mod = 1  # Chroma: no adaLN Linears in the blocks; its approximator makes every vector, once per input row
    if isinstance(config, ChromaConfig):
        a, mod = config.approximator_hidden, 0
        head += config.modulation_rows * (config.approximator_in * a + 2 * config.approximator_layers * a * a + a * D)
    else:
        head += (256 * D + D * D) * (2 if config.guidance_embed else 1) + config.pooled_dim * D + D * D
    total += 2 * batch * head
    L = N + T
    for i in range(config.num_double):
        per = 2 * 6 * D * D * mod + L * (3 * D * D + D * D + 2 * D * F)  # both streams
        total += rows(i) * (2 * per + attn(L, L))
    for j in range(config.num_single):
        i = config.num_double + j
        per = 3 * D * D * mod + L * (D * (3 * D + F) + (D + F) * D)
        total += rows(i) * (2 * per + attn(L, L))
    final = 2 * D * D * mod + N * D * config.in_channels
    total += 2 * rows(config.total_blocks) * final
    return total


def tokens(config, latent_hw: tuple[int, int]) -> int:
    h, w = latent_hw
    p = config.patch_size if isinstance(config, SD3Config) else 2
    return (h // p) * (w // p)


def peak_tflops(device_name: str, dtype: torch.dtype) -> float | None:
    for key, table in PEAK_TFLOPS:
        if key in device_name:
            return table.get(dtype)
    return None


# ---- environment and timing ----------------------------------------------------------------

def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
        else:
            name = platform.processor() or platform.machine()
    except OSError:
        name = platform.processor() or platform.machine()
    return f"{name} ({torch.get_num_threads()} threads)"


def environment(device) -> dict:
    try:  # the installed version, without importing it (seconds)
        dv = importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        dv = None
    return {"device": device_name(device), "torch": torch.__version__, "diffusers": dv,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> tuple[float, float, object]:
    """(wall seconds, process CPU seconds, result) of one call, synchronized before and after.

    On a CPU shared with other jobs the process CPU time (all threads) varies less than the
    wall time, which includes waiting for a core.
    """
    synchronize(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    synchronize(device)
    return time.perf_counter() - t0, time.process_time() - c0, out


def matmul_tflops(device, dtype, m: int, k: int, n: int, iters: int = 5) -> float:
    """This device's rate for one (m, k) @ (k, n) matmul in ``dtype`` (median of ``iters``):
    the ceiling a forward made mostly of such matmuls can approach."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=g).to(device=device, dtype=dtype)
    with torch.inference_mode():
        torch.mm(a, b)
        samples = [timed(lambda: torch.mm(a, b), device)[0] for _ in range(iters)]
    return 2 * m * k * n / statistics.median(samples) / 1e12


def peak_memory_mb(fn, device, model: torch.nn.Module) -> float:
    """Peak CUDA memory of one call of ``fn`` as if ``model`` were alone on the device (MiB):
    its weights plus what the call allocates above what was already there."""
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return (weights + torch.cuda.max_memory_allocated(device) - before) / 2 ** 20


def median_ms(samples: list[float]) -> float:
    return 1e3 * statistics.median(samples)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


# ---- the timed cases -----------------------------------------------------------------------

@dataclasses.dataclass
class Case:
    """One step both ways: ``ours()`` and ``peer()`` each return the guided velocity (``peer``
    None: ours alone)."""

    name: str
    rows_ours: str  # batch rows, for the table
    rows_peer: str
    flops_ours: int
    flops_peer: int
    ours: object
    peer: object


def attach_dg(ours, runner: PeerRunner | None, config, fork_block: int, batch: int, text_len: int = 0) -> None:
    """Our MA spec and the peer's DG hook on block m (the last ``batch`` of 3 * batch rows);
    ``text_len``: the text tokens before the image's in a FLUX.2 or Chroma single block's output.
    ``runner`` None: ours alone."""
    channels = ma_channels(config)
    ours.ma = mmdit.MASpec(channels, block=fork_block)
    if runner is None:
        return
    if runner.hook is not None:
        runner.hook.remove()
    device = next(runner.peer.parameters()).device
    runner.hook = runner.block(fork_block).register_forward_hook(
        zero_ma_hook(batch, torch.tensor(channels, device=device), text_len))


def build_cases(ours, runner: PeerRunner | None, config, inp: Inputs, fork_block: int, cfg: float = 4.5,
                dg: float = 2.0, names=("forward", "cfg", "cfg_dg"), slg: float = 2.8,
                slg_layers: tuple[int, ...] = ()) -> list[Case]:
    """forward (B rows); CFG step ([uncond | cond], 2B rows); CFG+DG step: ours one call with
    ``fork`` ([uncond | cond] forked at block m into [uncond | cond | cond_disrupted]); the
    diffusers way a batch of 3B rows with a forward hook on block m zeroing the MA channels of
    the last B rows' image tokens at that block's output (registered here on the peer).
    ``runner`` None: ours alone (every case's ``peer`` is None)."""
    B = inp.x.shape[0]
    shape = tuple(inp.x.shape)
    n_img, n_txt = tokens(config, shape[2:]), inp.context.shape[1]
    if runner is None:
        runner = _Alone()
        attach_dg(ours, None, config, fork_block, B, n_txt)
    elif runner.hook is None:
        attach_dg(ours, runner, config, fork_block, B, n_txt)
    out = []
    call = call_ours

    if "forward" in names:
        prep = runner.prepare(inp)
        flops = forward_flops(config, n_img, n_txt, B)
        out.append(Case("forward", f"{B}", f"{B}", flops, flops,
                        lambda: call(ours, inp), lambda: runner(prep, shape)))
    two = inp.repeat(2)
    if "cfg" in names:
        prep2 = runner.prepare(two)
        flops = forward_flops(config, n_img, n_txt, 2 * B)

        def ours_cfg():
            vu, vc = call(ours, two).chunk(2)
            return vu + cfg * (vc - vu)

        def peer_cfg():
            vu, vc = runner(prep2, shape).chunk(2)
            return vu + cfg * (vc - vu)
        out.append(Case("cfg", f"{2 * B}", f"{2 * B}", flops, flops, ours_cfg, peer_cfg))
    if "cfg_dg" in names:
        prep3 = runner.prepare(inp.repeat(3))
        fork = slice(B, 2 * B)  # the cond rows: static, as the sampler passes them

        def ours_dg():
            vu, vc, vd = call(ours, two, fork=fork).chunk(3)
            return vu + cfg * (vc - vu) + dg * (vc - vd)

        def peer_dg():  # the hook on block m disrupts the last B rows
            vu, vc, vd = runner(prep3, shape).chunk(3)
            return vu + cfg * (vc - vu) + dg * (vc - vd)
        out.append(Case("cfg_dg", f"{2 * B}->{3 * B}", f"{3 * B}",
                        forward_flops(config, n_img, n_txt, 2 * B, fork_block, B),
                        forward_flops(config, n_img, n_txt, 3 * B), ours_dg, peer_dg))
    out += slg_cases(ours, runner, config, inp, fork_block, cfg, dg, names, slg, slg_layers)
    if isinstance(runner, _Alone):
        out = [dataclasses.replace(case, peer=None) for case in out]
    return out


class _Alone:
    """Stands in for a PeerRunner when ours runs alone: its calls are built, never made."""
    flux = False
    hook = None

    def prepare(self, inp):
        return None

    def __call__(self, *args, **kwargs):
        raise RuntimeError("no peer: ours alone")


def slg_cases(ours, runner, config, inp: Inputs, fork_block: int, cfg: float, dg: float, names, slg: float,
              layers: tuple[int, ...]) -> list[Case]:
    """CFG+SLG and CFG+DG+SLG steps (SD3 only: diffusers' SD3 transformer takes ``skip_layers``).
    Ours: one call, SLG a branch of the cond rows born at its first skipped block; diffusers:
    its pipeline's way, a second call of the cond rows with ``skip_layers``."""
    from mmdit.branches import Branch, SkipLayers

    wanted = [n for n in ("cfg_slg", "cfg_dg_slg") if n in names]
    if not wanted:
        return []
    if runner.flux:
        raise SystemExit("the SLG cases need an SD3 preset (diffusers' FLUX transformer has no skip_layers)")
    B, shape = inp.x.shape[0], tuple(inp.x.shape)
    n_img, n_txt = tokens(config, shape[2:]), inp.context.shape[1]
    two, cond_rows = inp.repeat(2), slice(B, 2 * B)
    skip = (Branch(cond_rows, SkipLayers(layers)),)
    prep1, prep2, prep3 = runner.prepare(inp), runner.prepare(two), runner.prepare(inp.repeat(3))
    slg_branch = (B, min(layers), layers)
    out = []

    def call(**kw):
        return call_ours(ours, two, **kw)

    def ours_slg():
        vu, vc, vs = call(branches=skip).chunk(3)
        return vu + cfg * (vc - vu) + slg * (vc - vs)

    def peer_slg():
        vu, vc = runner(prep2, shape).chunk(2)
        vs = runner(prep1, shape, skip_layers=list(layers))
        return vu + cfg * (vc - vu) + slg * (vc - vs)

    def ours_dg_slg():
        vu, vc, vd, vs = call(fork=cond_rows, branches=skip).chunk(4)
        return vu + cfg * (vc - vu) + dg * (vc - vd) + slg * (vc - vs)

    def peer_dg_slg():
        vu, vc, vd = runner(prep3, shape).chunk(3)
        vs = runner(prep1, shape, skip_layers=list(layers))
        return vu + cfg * (vc - vu) + dg * (vc - vd) + slg * (vc - vs)

    skip_flops = forward_flops(config, n_img, n_txt, B, skipped=layers)  # the peer's SLG pass
    if "cfg_slg" in wanted:
        out.append(Case("cfg_slg", f"{2 * B}->{3 * B}", f"{2 * B}+{B}",
                        forward_flops(config, n_img, n_txt, 2 * B, branches=(slg_branch,)),
                        forward_flops(config, n_img, n_txt, 2 * B) + skip_flops, ours_slg, peer_slg))
    if "cfg_dg_slg" in wanted:
        out.append(Case("cfg_dg_slg", f"{2 * B}->{4 * B}", f"{3 * B}+{B}",
                        forward_flops(config, n_img, n_txt, 2 * B, fork_block, B, branches=(slg_branch,)),
                        forward_flops(config, n_img, n_txt, 3 * B) + skip_flops, ours_dg_slg, peer_dg_slg))
    return out


def describe_model(out: dict) -> str:
    """'sd3.5-medium (hidden 1536, 4 blocks), float32' from a result dict's preset and config."""
    c = out["config"]
    depth = c["num_layers"] if "num_layers" in c else f"{c['num_double']}+{c['num_single']}"
    return f"{out['preset']} (hidden {c['num_heads'] * c['head_dim']}, {depth} blocks), {out['dtype']}"
