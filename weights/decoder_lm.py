"""Load the decoder-LM text encoders (Mistral-Small-3.x, Qwen3, Qwen2.5-VL and Qwen3-VL language
models) from every layout they ship in:

* transformers folders, sharded with an index or not, as saved by transformers 5 and 4.x:
  ``model.language_model.*`` (Mistral3 / Qwen2.5-VL / Qwen3-VL, >= 4.52), the legacy
  ``language_model.model.*`` (Mistral3) and ``model.*`` + ``visual.*`` (Qwen2.5-VL), and
  ``model.*`` (Qwen3ForCausalLM); a diffusers pipeline folder reads its ``text_encoder/``;
* single files as ComfyUI ships them: language-model keys (``model.*``, or none), maybe with a
  vision tower, an LM head or ComfyUI's ``tekken_model`` tokenizer blob beside them, maybe a
  ``text_encoders.<name>.transformer.`` wrapper, bf16, fp8 or ComfyUI scaled fp8.

The language model is found by its ``embed_tokens.weight`` next to ``layers.0.``; everything
outside that prefix (vision tower, projector, LM head) and the LM head and tokenizer blob inside
it are skipped; every other key must match the model, strictly. Sizes come from the shapes;
the RMS eps, RoPE base and head width from config.json, else from the preset whose shapes the
file has (``config=`` names one when two presets share shapes: Qwen3-8B and Qwen3-VL-8B).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import torch

from ..encoders.decoder_lm import DECODER_LM_PRESETS, DecoderLM, DecoderLMConfig
from .checkpoint import CheckpointError, count_indexed, load_into, mismatches, open_checkpoint, read_json
from .formats import Canonical

ANCHOR = "embed_tokens.weight"
SKIP_INSIDE = ("lm_head.", "visual.", "vision_tower.", "multi_modal_projector.", "tekken_model")
LM_MODEL_TYPES = ("mistral", "mistral3", "qwen3", "qwen2_5_vl", "qwen2_5_vl_text", "qwen3_vl", "qwen3_vl_text",
                  "qwen2", "llama")
_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
                 "qkv_bias", "qk_norm")


def load_decoder_lm(source: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu", *,
                    config: str | DecoderLMConfig | None = None, num_layers: int | None = None) -> DecoderLM:
    """A :class:`DecoderLM` from a folder, an ``*.index.json`` or a ``.safetensors`` file.

    ``config``: a preset name or a config whose eps / RoPE base / head width to use where the
    file has no config.json (sizes and the layer count still come from the file).
    ``num_layers``: keep only the first N decoder layers (and no final norm), e.g. 30 for
    FLUX.2 [dev]'s Mistral, which reads hidden states 10/20/30 only; the rest is checked, not read.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a text encoder folder, a .safetensors file or an "
                              "*.index.json")
    if path.is_dir() and (path / "model_index.json").is_file():
        if not (path / "text_encoder").is_dir():
            raise CheckpointError(f"{path} is a diffusers pipeline folder without a text_encoder/ subfolder")
        path = path / "text_encoder"
    where = str(path)
    stem = "model" if path.is_dir() and any(path.glob("model*.safetensors*")) else None
    ckpt = Canonical(open_checkpoint(path, stem), where)
    cj = read_json((path if path.is_dir() else path.parent) / "config.json")
    if cj is not None and cj.get("model_type") not in LM_MODEL_TYPES:
        cj = None  # a config.json of something else next to a single file
    prefix = find_prefix(ckpt, where)
    names = {}
    for theirs in ckpt:
        if theirs.startswith(prefix) and not theirs[len(prefix):].startswith(SKIP_INSIDE):
            names[theirs[len(prefix):]] = theirs
    shapes = {ours: ckpt.shape(theirs) for ours, theirs in names.items()}
    cfg = lm_config(shapes, cj, config, where)
    layout = f"decoder LM, prefix {prefix!r} in {where}"
    with torch.device("meta"):
        full = DecoderLM(cfg)
    problems = mismatches({k: v.shape for k, v in full.state_dict().items()}, shapes)
    if problems:
        raise CheckpointError("\n  ".join([f"checkpoint does not match the model (detected layout: {layout})",
                                            *problems]))
    if num_layers is not None:
        if not 1 <= num_layers <= cfg.num_layers:
            raise ValueError(f"num_layers must be in 1..{cfg.num_layers} (the file's layers), got {num_layers}")
        cfg = dataclasses.replace(cfg, num_layers=num_layers, final_norm=False)
        keep = lambda k: not k.startswith("layers.") or int(k.split(".")[1]) < num_layers  # noqa: E731
        names = {k: v for k, v in names.items() if keep(k) and k != "norm.weight"}
    with torch.device("meta"):
        model = DecoderLM(cfg)
    load_into(model, {ours: partial(ckpt.__getitem__, theirs) for ours, theirs in names.items()}, shapes,
              dtype=dtype, device=device, layout=layout)
    model.source_files = list(ckpt.files)
    return model.eval().requires_grad_(False)


def is_decoder_lm(path: Path) -> bool:
    """Whether ``path`` (a pipeline folder, a component folder or a file) holds a decoder LM."""
    if path.is_dir() and (path / "model_index.json").is_file():
        cj = read_json(path / "text_encoder" / "config.json")
        return cj is not None and cj.get("model_type") in LM_MODEL_TYPES
    if path.is_dir():
        cj = read_json(path / "config.json")
        if cj is not None:
            return cj.get("model_type") in LM_MODEL_TYPES
    try:
        ckpt = open_checkpoint(path, "model" if path.is_dir() else None)
    except CheckpointError:
        return False
    return _prefixes(ckpt) != []


def find_prefix(keys, where: str) -> str:
    """The prefix of the language model's keys: what precedes ``embed_tokens.weight``."""
    keys = list(keys)
    found = _prefixes(keys)
    if not found and any(k.endswith("tok_embeddings.weight") for k in keys):
        raise CheckpointError(f"{where} is in Mistral's own layout (consolidated.safetensors: tok_embeddings, "
                              "attention.wq, ...), which is not supported; use the transformers files of the same "
                              "repo (model-*.safetensors + index) or ComfyUI's text-encoder file")
    if not found:
        raise CheckpointError(f"{where} holds no decoder language model (no '<prefix>{ANCHOR}' beside "
                              f"'<prefix>layers.0.'; found e.g. {sorted(keys)[:4]})")
    if len(found) > 1:
        raise CheckpointError(f"{where} holds several language models (prefixes {found}); save the one you "
                              "mean on its own")
    return found[0]


def _prefixes(keys) -> list[str]:
    keys = list(keys)
    starts = {k[:-len(ANCHOR)] for k in keys if k.endswith(ANCHOR)}
    return sorted(p for p in starts if any(k.startswith(p + "layers.0.") for k in keys))


def lm_config(shapes: Mapping[str, tuple[int, ...]], cj: dict | None, config: str | DecoderLMConfig | None,
              where: str) -> DecoderLMConfig:
    """The config of the file whose language-model ``shapes`` (our names) are given."""
    if isinstance(config, str):
        if config not in DECODER_LM_PRESETS:
            raise ValueError(f"unknown decoder LM preset {config!r}; choose one of {sorted(DECODER_LM_PRESETS)}")
        config = DECODER_LM_PRESETS[config]
    vocab, hidden = _need(shapes, ANCHOR, where)
    fields = dict(vocab_size=vocab, hidden_size=hidden,
                  intermediate_size=_need(shapes, "layers.0.mlp.gate_proj.weight", where)[0],
                  num_layers=count_indexed(shapes, "layers.{}."),
                  qkv_bias="layers.0.self_attn.q_proj.bias" in shapes,
                  qk_norm="layers.0.self_attn.q_norm.weight" in shapes,
                  final_norm="norm.weight" in shapes)
    q_out = _need(shapes, "layers.0.self_attn.q_proj.weight", where)[0]
    kv_out = _need(shapes, "layers.0.self_attn.k_proj.weight", where)[0]
    if config is not None:
        head_dim, extra = config.head_dim, dict(rms_eps=config.rms_eps, rope_theta=config.rope_theta)
    elif cj is not None:
        head_dim, extra = _from_json(cj, where)
    else:
        head_dim, extra = _from_presets(fields, q_out, kv_out, where)
    if fields["qk_norm"]:
        head_dim = shapes["layers.0.self_attn.q_norm.weight"][0]
    if q_out % head_dim or kv_out % head_dim:
        raise CheckpointError(f"{where}: q_proj ({q_out}) and k_proj ({kv_out}) rows are not whole heads of "
                              f"{head_dim}; pass config= with the right head_dim")
    fields.update(extra, head_dim=head_dim, num_heads=q_out // head_dim, num_kv_heads=kv_out // head_dim)
    try:
        return DecoderLMConfig(**fields)
    except ValueError as e:
        raise CheckpointError(f"{where}: inferred an impossible decoder LM config ({e})") from None


def _from_json(cj: dict, where: str) -> tuple[int, dict]:
    tc = {**cj, **(cj.get("text_config") or {})}  # transformers 4.x saved Qwen2.5-VL's text fields flat
    rope = tc.get("rope_parameters") or tc.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "mrope"):
        raise CheckpointError(f"{where}: RoPE scaling {kind!r} is not supported (only plain RoPE, as the "
                              "Mistral-Small / Qwen text encoders use)")
    theta = rope.get("rope_theta", tc.get("rope_theta"))
    if theta is None or tc.get("hidden_size") is None:
        raise CheckpointError(f"{where}: config.json has no rope_theta / hidden_size; remove it or fix it")
    heads = tc.get("num_attention_heads")
    head_dim = tc.get("head_dim") or tc["hidden_size"] // heads
    return head_dim, dict(rms_eps=tc.get("rms_norm_eps", 1e-6), rope_theta=float(theta))


def _from_presets(fields: dict, q_out: int, kv_out: int, where: str) -> tuple[int, dict]:
    """eps / theta / head_dim of the presets with these shapes; one error if none or they disagree."""
    found = {}
    for name, p in DECODER_LM_PRESETS.items():
        shape = dict(fields, num_heads=q_out // p.head_dim, num_kv_heads=kv_out // p.head_dim, head_dim=p.head_dim)
        if all(getattr(p, f) == shape[f] for f in _SHAPE_FIELDS):
            found[name] = p
    if not found:
        raise CheckpointError(f"{where}: no config.json and the shapes (hidden {fields['hidden_size']}, vocab "
                              f"{fields['vocab_size']}) match no preset; pass config= a preset name or a "
                              f"DecoderLMConfig ({sorted(DECODER_LM_PRESETS)})")
    values = {(p.head_dim, p.rms_eps, p.rope_theta) for p in found.values()}
    if len(values) > 1:
        raise CheckpointError(f"{where}: the shapes fit the presets {sorted(found)}, which differ in RoPE base / "
                              "eps; pass config= the one this file is")
    head_dim, eps, theta = values.pop()
    return head_dim, dict(rms_eps=eps, rope_theta=theta)


def _need(shapes: Mapping, key: str, where: str) -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(f"{where} is missing {key!r}, needed to infer the architecture (one shard of a "
                              "multi-file checkpoint? point at the folder or its index.json)")
    return shapes[key]
