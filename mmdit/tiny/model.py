"""The tiny model itself: its transformer and text-encoder configs, the conditioner, save / load, sampling."""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ..encoders.clip import CLIPConfig, CLIPTextEncoder
from ..ma import MASpec, spec_from_json, spec_to_json
from ..models.sd3 import SD3Config
from ..models.sd3 import SD3Transformer
from .wordtok import WordTokenizer

FORMAT = "mmdit-tiny/1"
MAX_LENGTH = 16  # <bos> + the longest caption (9 words) + <eos>, with room to spare


def transformer_config(**overrides) -> SD3Config:
    """The shipped transformer: 2 heads x 32, 4 joint blocks, patch 4 on 64x64 RGB (16x16 tokens)."""
    base = dict(num_layers=4, num_heads=2, head_dim=32, patch_size=4, in_channels=3, out_channels=3,
                pos_embed_max_size=16, context_dim=64, pooled_dim=64, qk_norm=True, mlp_ratio=4.0)
    return SD3Config(**{**base, **overrides})


def text_config(vocab_size: int, **overrides) -> CLIPConfig:
    """The shipped text encoder: width 64, 2 layers, 2 heads; no projection (pooled = EOS state)."""
    base = dict(vocab_size=vocab_size, width=64, num_layers=2, num_heads=2, mlp_dim=256,
                max_positions=MAX_LENGTH, activation="gelu", projection_dim=None, eos_token_id=3)
    return CLIPConfig(**{**base, **overrides})


@dataclass
class ImageSettings:
    """How to sample the tiny model: pixel space, so the output is the image itself."""

    size: int = 64
    channels: int = 3
    space: str = "pixel"  # no VAE: the transformer's output is RGB in [-1, 1]
    steps: int = 16
    cfg: float = 4.0
    dg: float = 0.0
    shift: float = 3.0  # SD3 time shift of the sampling schedule (mmdit.samplers.sd3_sigmas)


class TinyConditioner(nn.Module):
    """Prompts -> ``{"context": (B, L, context_dim), "pooled": (B, width)}``.

    context = the CLIP's last hidden states (after the final LN), zero-padded on the channel
    axis to the transformer's ``context_dim`` (SD3 pads CLIP features to T5's width the same
    way); pooled = the final-LN state at ``<eos>``.
    """

    def __init__(self, tokenizer: WordTokenizer, config: CLIPConfig, context_dim: int,
                 max_length: int = MAX_LENGTH):
        super().__init__()
        if config.eos_token_id != tokenizer.eos_id:
            raise ValueError(f"the CLIP config reads the pooled state at id {config.eos_token_id}, "
                             f"but the tokenizer's <eos> is {tokenizer.eos_id}")
        if context_dim < config.width:
            raise ValueError(f"context_dim {context_dim} is smaller than the text width {config.width}")
        self.tokenizer, self.max_length, self.context_dim = tokenizer, max_length, context_dim
        self.text_encoder = CLIPTextEncoder(config)

    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """ids (B, L) from ``self.tokenizer`` -> context (B, L, context_dim), pooled (B, width)."""
        out = self.text_encoder(ids)
        context = F.pad(out.hidden, (0, self.context_dim - out.hidden.shape[-1]))
        return {"context": context, "pooled": out.pooled}

    def tokenize(self, prompts: str | Sequence[str]) -> torch.Tensor:
        device = self.text_encoder.embeddings["token_embedding"].weight.device
        return self.tokenizer(prompts, self.max_length).to(device)

    def encode(self, prompts: str | Sequence[str]) -> dict[str, torch.Tensor]:
        """A list of prompts (or one) -> the conditioning dict (the empty prompt is the uncond)."""
        return self(self.tokenize(prompts))


@dataclass
class Tiny:
    """What ``load_tiny`` returns; unpacks as ``transformer, conditioner, settings = load_tiny()``."""

    transformer: SD3Transformer
    conditioner: TinyConditioner
    settings: ImageSettings
    meta: dict = field(default_factory=dict)  # config.json's other entries (training record, MA table)

    def __iter__(self):
        return iter((self.transformer, self.conditioner, self.settings))


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """2D sin-cos table (1, grid*grid, dim), row-major; half the channels encode the row,
    half the column, each [sin | cos] over ``dim // 4`` frequencies (MAE / DiT)."""
    if dim % 4:
        raise ValueError(f"a 2D sin-cos table needs dim divisible by 4, got {dim}")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    pos = torch.arange(grid, dtype=torch.float64)
    one = torch.outer(pos, freqs)
    one = torch.cat([one.sin(), one.cos()], 1)  # (grid, dim/2)
    rows = one[:, None].expand(grid, grid, -1)
    cols = one[None, :].expand(grid, grid, -1)
    return torch.cat([rows, cols], -1).reshape(1, grid * grid, dim).float()


def init_transformer(model: SD3Transformer) -> SD3Transformer:
    """DiT-style init: xavier linears, zero adaLN outputs (every block starts as the identity)
    and a zero output layer; the sin-cos table goes into the (otherwise zero) pos_embed buffer."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    w = model.x_embedder.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(model.x_embedder.proj.bias)
    for emb in (model.t_embedder, model.y_embedder):
        nn.init.normal_(emb.mlp[0].weight, std=0.02)
        nn.init.normal_(emb.mlp[2].weight, std=0.02)
    for block in model.joint_blocks:
        for stream in (block.context_block, block.x_block):
            nn.init.zeros_(stream.adaLN_modulation[-1].weight)
            nn.init.zeros_(stream.adaLN_modulation[-1].bias)
    nn.init.zeros_(model.final_layer.adaLN_modulation[-1].weight)
    nn.init.zeros_(model.final_layer.adaLN_modulation[-1].bias)
    nn.init.zeros_(model.final_layer.linear.weight)
    nn.init.zeros_(model.final_layer.linear.bias)
    c = model.config
    model.pos_embed.copy_(sincos_pos_embed(c.hidden_size, c.pos_embed_max_size))
    return model


def build_tiny(seed: int = 0, tokenizer: WordTokenizer | None = None, *, transformer: dict | None = None,
               text: dict | None = None) -> tuple[SD3Transformer, TinyConditioner]:
    """A freshly initialised (transformer, conditioner) pair; ``transformer`` / ``text`` override
    config fields (e.g. ``transformer={"num_layers": 1}`` for tests)."""
    from .shapes import all_words

    tokenizer = tokenizer or WordTokenizer.from_words(all_words())
    tcfg = transformer_config(**(transformer or {}))
    ccfg = text_config(len(tokenizer), **(text or {}))
    torch.manual_seed(seed)
    model = init_transformer(SD3Transformer(tcfg))
    conditioner = TinyConditioner(tokenizer, ccfg, tcfg.context_dim)
    nn.init.normal_(conditioner.text_encoder.embeddings["token_embedding"].weight, std=0.02)
    nn.init.normal_(conditioner.text_encoder.embeddings["position_embedding"].weight, std=0.01)
    return model, conditioner


def default_folder() -> Path:
    """The shipped ``mmdit/weights/tiny/`` (package data of ``mmdit.weights``)."""
    from .. import weights

    return Path(weights.__file__).parent / "tiny"


def _config_dict(cfg) -> dict:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.init}


def save_tiny(folder: str | os.PathLike, transformer: SD3Transformer, conditioner: TinyConditioner,
              settings: ImageSettings | None = None, *, ma: MASpec | None = None, meta: dict | None = None,
              dtype: torch.dtype = torch.float16) -> Path:
    """Write the four files of a tiny-model folder; weights are stored in ``dtype`` (fp16 halves
    the size; the pos_embed table and the rest load back as float32)."""

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def tensors(module):
        return {k: v.detach().to("cpu", dtype).contiguous() for k, v in module.state_dict().items()}

    save_file(tensors(transformer), folder / "transformer.safetensors", metadata={"format": FORMAT})
    save_file(tensors(conditioner.text_encoder), folder / "text_encoder.safetensors", metadata={"format": FORMAT})
    conditioner.tokenizer.save(folder / "vocab.json")
    config = {
        "format": FORMAT,
        "transformer": _config_dict(transformer.config),
        "text_encoder": _config_dict(conditioner.text_encoder.config),
        "max_length": conditioner.max_length,
        "image": dataclasses.asdict(settings or ImageSettings()),
        "ma": None if ma is None else spec_to_json(ma),
        **(meta or {}),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    return folder


def store_ma(folder: str | os.PathLike, spec: MASpec, calibration: dict) -> Path:
    """Write a new MA spec and the calibration behind it into a tiny folder's config.json (only
    its ``ma`` and ``ma_calibration`` entries change); ``load_tiny`` sets it as ``transformer.ma``."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    config["ma"], config["ma_calibration"] = spec_to_json(spec), calibration
    path.write_text(json.dumps(config, indent=1) + "\n")
    return path


def load_tiny(folder: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> Tiny:
    """The tiny model from ``folder`` (default: the shipped ``mmdit/weights/tiny/``), in eval mode.

    ``model.ma`` is set from config.json's MA spec, so ``dg`` works out of the box.
    """
    folder = default_folder() if folder is None else Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        hint = ("the package was installed without its data; reinstall with `pip install -e .`"
                if folder == default_folder() else "train one with `mmdit train --out FOLDER`")
        raise FileNotFoundError(f"no tiny model at {folder} (config.json missing); {hint}")
    try:
        config = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({e}); the folder is damaged: train it again") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{cfg_path} is not a tiny-model config (format {found!r}, expected {FORMAT!r})")
    tcfg = SD3Config(**config["transformer"])
    ccfg = CLIPConfig(**config["text_encoder"])
    tokenizer = WordTokenizer.from_file(folder / "vocab.json")
    if len(tokenizer) != ccfg.vocab_size:
        raise ValueError(f"vocab.json has {len(tokenizer)} words but the text encoder expects {ccfg.vocab_size}")
    with torch.device("meta"):
        transformer = SD3Transformer(tcfg)
        conditioner = TinyConditioner(tokenizer, ccfg, tcfg.context_dim, config["max_length"])
    for module, name in ((transformer, "transformer"), (conditioner.text_encoder, "text_encoder")):
        module.load_state_dict(_read(folder / f"{name}.safetensors", device, dtype), strict=True, assign=True)
    ma = config.get("ma")
    if ma is not None:
        transformer.ma = spec_from_json(ma)
    known = {f.name for f in dataclasses.fields(ImageSettings)}
    settings = ImageSettings(**{k: v for k, v in config["image"].items() if k in known})
    meta = {k: v for k, v in config.items()
            if k not in ("format", "transformer", "text_encoder", "max_length", "image", "ma")}
    return Tiny(transformer.eval(), conditioner.eval(), settings, meta)


def _read(path: Path, device, dtype) -> dict[str, torch.Tensor]:
    """A tiny folder's weight file, with the same one-line errors as any checkpoint (missing, truncated)."""
    from ..weights.checkpoint import Checkpoint, CheckpointError

    if not path.is_file():
        raise CheckpointError(f"{path} is missing: this tiny-model folder is incomplete (train it again, or copy it "
                              "whole)")
    ckpt = Checkpoint([path])
    return {k: ckpt[k].to(device, dtype) for k in ckpt}


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, for PIL / PNG."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


@torch.no_grad()
def generate(tiny: Tiny, prompts: str | Sequence[str], seed: int | Sequence[int] = 0, *,
             steps: int | None = None, cfg: float | None = None, dg: float | None = None,
             shift: float | None = None, negative_prompt: str = "") -> torch.Tensor:
    """Sample ``len(prompts)`` images (B, 3, size, size) in [-1, 1]; settings default to the model's.

    seed: one seed for the batch, or one per prompt (each image's noise then depends only on it).
    """
    from ..samplers import Guidance, sample, sd3_sigmas

    if isinstance(prompts, str):
        prompts = [prompts]
    s = tiny.settings
    steps, cfg, dg, shift = (s.steps if steps is None else steps, s.cfg if cfg is None else cfg,
                             s.dg if dg is None else dg, s.shift if shift is None else shift)
    shape = (s.channels, s.size, s.size)
    if isinstance(seed, int):
        noise = torch.randn(len(prompts), *shape, generator=torch.Generator().manual_seed(seed))
    else:
        if len(seed) != len(prompts):
            raise ValueError(f"{len(seed)} seeds for {len(prompts)} prompts")
        noise = torch.stack([torch.randn(*shape, generator=torch.Generator().manual_seed(int(k))) for k in seed])
    param = next(tiny.transformer.parameters())
    cond = tiny.conditioner.encode(list(prompts))
    uncond = tiny.conditioner.encode([negative_prompt]) if cfg != 1.0 else None
    x = sample(tiny.transformer, noise.to(param.device, param.dtype), sd3_sigmas(steps, shift), cond, uncond,
               guide=Guidance(cfg=cfg, dg=dg))
    return x.clamp(-1, 1)
