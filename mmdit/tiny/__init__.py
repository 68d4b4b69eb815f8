"""The demo model the project trained itself: a pixel-space SD3-family MMDiT on a shapes dataset.

Three parts, saved together in one folder (the shipped one is ``mmdit/weights/tiny/``;
``mmdit train --out FOLDER`` writes a new one):

    transformer.safetensors   SD3Transformer (Stability key names), 64x64 RGB in [-1, 1], patch 4
    text_encoder.safetensors  a 2-layer CLIPTextEncoder over a word-level vocabulary
    vocab.json                the WordTokenizer's words -> ids
    config.json               both configs, the prompt length, the image settings
                              (size, steps, cfg, dg, shift), the MA spec and how it was trained

``load_tiny()`` returns them ready to sample::

    tiny = mmdit.tiny.load_tiny()
    images = mmdit.tiny.generate(tiny, ["a red circle on a blue background"], seed=0)  # (B, 3, 64, 64)

The modules: ``shapes`` (the procedural captioned dataset and the readers that score an
image's colours, shape and texture), ``wordtok`` (the word-level tokenizer), ``model``
(configs, conditioner, save / load / generate), ``recipe`` (how the shipped weights were
trained; ``mmdit train``, with checkpoints and resume) and ``malog`` (the per-block
massive-activation statistics logged while training).
"""
from .model import (FORMAT, MAX_LENGTH, ImageSettings, Tiny, TinyConditioner, build_tiny, default_folder,
                    generate, init_transformer, load_tiny, save_tiny, sincos_pos_embed, store_ma, text_config,
                    to_uint8, transformer_config)
from .wordtok import WordTokenizer

__all__ = ["FORMAT", "MAX_LENGTH", "ImageSettings", "Tiny", "TinyConditioner", "WordTokenizer", "build_tiny",
           "default_folder", "generate", "init_transformer", "load_tiny", "save_tiny", "sincos_pos_embed",
           "store_ma", "text_config", "to_uint8", "transformer_config"]
