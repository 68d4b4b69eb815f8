"""Tiny Qwen-Image pipelines for end-to-end tests: a saved ``QwenImagePipeline`` (1.0) and a
``QwenImage21Pipeline`` folder (2.1, text to image), built from the peers of peers_qwen,
peers_lm and peers_vae with random weights. Test-only (imports diffusers and transformers).

    folder, pipe = qwen_folder(tmp)        # the diffusers pipeline and the folder it saved
    folder, pipe = qwen21_folder(tmp)      # 2.1: the processor is peers_lm's text-only stand-in
"""
from __future__ import annotations

import json
from pathlib import Path

import peers
import peers_lm as P
import peers_qwen as pq
import peers_vae as pv

# Qwen/Qwen-Image's scheduler_config.json (research notes, section 3); 2.1 ships the same one
SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9,
                 num_train_timesteps=1000, shift=1.0, shift_terminal=0.02, time_shift_type="exponential",
                 use_dynamic_shifting=True)
TEXT_DIM = 32  # the tiny Qwen2.5-VL / Qwen3-VL hidden size = the transformers' context width


def scheduler():
    """diffusers' FlowMatchEulerDiscreteScheduler with Qwen-Image's settings."""
    return peers.diffusers().FlowMatchEulerDiscreteScheduler(**SCHEDULER)


def qwen_folder(root: Path):
    """A tiny QwenImagePipeline saved to ``root/pipe``: Qwen2.5-VL (3 layers, width 32) with the
    real template's tokenizer, the 1.0 transformer (2 blocks, 16 latent channels; one head of the
    released 128, so a single file of it loads without a config.json), the Wan-2.1 VAE (8x, random
    latent statistics). Returns (folder, the pipeline)."""
    peers.diffusers()
    from diffusers import QwenImagePipeline

    tok = P.write_qwen_tokenizer(Path(root) / "tok", P.QWEN3_TEMPLATE)
    pipe = QwenImagePipeline(scheduler=scheduler(), vae=pv.qwen_peer(seed=3),
                             text_encoder=P.qwen2_5_vl(vocab=len(tok), seed=4), tokenizer=tok,
                             transformer=pq.qwen_peer(**{**pq.LOAD10, "context_dim": TEXT_DIM, "latent": 16}, seed=5))
    pipe.save_pretrained(Path(root) / "pipe")
    return Path(root) / "pipe", pipe


def qwen21_folder(root: Path):
    """A tiny QwenImage21Pipeline (Qwen3-VL, the 2.1 transformer with 64 latent channels, the 16x
    RGBA VAE) and its folder, written component by component: its processor is the text-only
    stand-in (the real Qwen3VLProcessor needs torchvision), saved as the tokenizer it wraps in
    ``processor/``, as on the hub. Returns (folder, the pipeline)."""
    peers.diffusers()
    from diffusers import QwenImage21Pipeline

    folder = Path(root) / "pipe21"
    tok = P.write_qwen_tokenizer(folder / "processor", P.QWEN3_TEMPLATE)
    parts = dict(scheduler=scheduler(), vae=pv.qwen21_peer(seed=3), text_encoder=P.qwen3_vl(vocab=len(tok), seed=4),
                 processor=P.TextOnlyQwen3VLProcessor(tok),
                 transformer=pq.qwen21_peer(context_dim=TEXT_DIM, latent=64, seed=5))
    pipe = QwenImage21Pipeline(**parts)
    for name in ("scheduler", "vae", "text_encoder", "transformer"):
        parts[name].save_pretrained(folder / name)
    index = {"_class_name": "QwenImage21Pipeline", "_diffusers_version": "0.42.1",
             "processor": ["transformers", "Qwen3VLProcessor"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "Qwen3VLForConditionalGeneration"],
             "transformer": ["diffusers", "QwenImage21Transformer2DModel"],
             "vae": ["diffusers", "AutoencoderKLQwenImage21"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder, pipe
