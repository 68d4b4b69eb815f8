"""What the tests share: tiny models, inputs, reference loops, tokenizer writers, one relative error.

Test modules import from here (and from peers.py, the diffusers peers), never from each other.
"""
from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import torch

import mmdit
from mmdit.models.rows import BlockRows

WORDS = ("a photo of an astronaut riding horse on mars the quick brown fox jumps over lazy dog cat sitting "
         "mat painting city night neon lights watercolor portrait woman man old young red green blue "
         "highly detailed 4k sharp focus trending artstation café naïve résumé über straße 東京 日本語 "
         "emoji 🙂 🐱 12345 3.14 don't it's we're they've i'm you'll he'd hello world").split()


def corpus(n: int = 600, seed: int = 0) -> list[str]:
    rnd = random.Random(seed)
    punct = [".", "!", "?", ",", "", "!!", "...", ";", " :)"]
    return [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(3, 14))) + rnd.choice(punct) for _ in range(n)]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable char map (its order fixes CLIP's first 256 ids: "!" = 0)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _added(content: str, normalized: bool) -> dict:
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
            "single_word": False, "special": True}


def write_clip_tokenizer(folder: Path, pad: str = "<|endoftext|>", vocab_size: int = 900) -> Path:
    """vocab.json / merges.txt laid out like OpenAI's (bytes, bytes+</w>, merges, BOS, EOS) + hub configs."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    split = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="removed", invert=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, end_of_word_suffix="</w>", show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
              for m in json.loads(tok.to_str())["model"]["merges"]]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    assert len(set(vocab)) == len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    bos, eos = len(vocab) - 2, len(vocab) - 1
    decoder = {str(bos): _added("<|startoftext|>", True), str(eos): _added("<|endoftext|>", False)}
    if pad == "!":  # SD3 / SDXL tokenizer_2
        decoder = {"0": _added("!", False), **decoder}
    config = {"add_prefix_space": False, "added_tokens_decoder": decoder, "bos_token": "<|startoftext|>",
              "clean_up_tokenization_spaces": True, "do_lower_case": True, "eos_token": "<|endoftext|>",
              "errors": "replace", "model_max_length": 77, "pad_token": pad, "tokenizer_class": "CLIPTokenizer",
              "unk_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    special = {"bos_token": {k: v for k, v in _added("<|startoftext|>", True).items() if k != "special"},
               "eos_token": {k: v for k, v in _added("<|endoftext|>", False).items() if k != "special"},
               "pad_token": pad,
               "unk_token": {k: v for k, v in _added("<|endoftext|>", False).items() if k != "special"}}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return folder


def write_t5_tokenizer(folder: Path, vocab_size: int = 120) -> Path:
    """A unigram spiece.model trained with T5's special ids (<pad> 0, </s> 1, <unk> 2, no BOS) + hub configs."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "corpus.txt"
    text.write_text("\n".join(corpus()), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(folder / "spiece"), vocab_size=vocab_size,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    text.unlink()
    (folder / "spiece.vocab").unlink()
    n = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model")).get_piece_size()
    decoder = {str(i): {**_added(t, False)} for i, t in enumerate(["<pad>", "</s>", "<unk>"])}
    decoder.update({str(n + 99 - i): _added(f"<extra_id_{i}>", False) for i in range(100)})
    extra = [f"<extra_id_{i}>" for i in range(100)]
    config = {"added_tokens_decoder": decoder, "additional_special_tokens": extra, "clean_up_tokenization_spaces": True,
              "eos_token": "</s>", "extra_ids": 100, "legacy": True, "model_max_length": 512, "pad_token": "<pad>",
              "sp_model_kwargs": {}, "tokenizer_class": "T5Tokenizer", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {"additional_special_tokens": extra, "eos_token": _added("</s>", False),
               "pad_token": _added("<pad>", False), "unk_token": _added("<unk>", False)}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return folder


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref| (fp32)."""
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12)).item()


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, str(path))  # untie shared storage
    return path


PIXEL_TOL = 1e-3  # per pixel in [0, 1]: a whole pipeline against diffusers'


# ---- tiny transformers and their inputs ----------------------------------------------------

TINY = {
    "sd3": dict(name="sd3.5-medium", num_layers=3, num_heads=2, head_dim=16, context_dim=24,
                pooled_dim=20, pos_embed_max_size=16, dual_attention_layers=(0,)),
    "flux": dict(name="flux.1-dev", num_double=2, num_single=2, num_heads=2, head_dim=16,
                 axes_dim=(4, 6, 6), context_dim=24, pooled_dim=20),
    "qwen-image": dict(name="qwen-image", num_layers=3, num_heads=2, head_dim=16, axes_dim=(8, 4, 4), context_dim=24),
}
TOL = 1e-5  # fp32, same computation path


def tiny(family, **extra):
    kw = dict(TINY[family], **extra)
    torch.manual_seed(0)
    model = mmdit.build_transformer(kw.pop("name"), **kw).eval()
    for p in model.parameters():  # torch's zero/one inits would hide wiring mistakes
        p.data.normal_(0, 0.1)
    return model


def inputs(model, B=3, H=12, W=10, L=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(B, 16, H, W, generator=g)
    sigma = torch.rand(B, generator=g)
    ctx = torch.randn(B, L, cfg.context_dim, generator=g)
    pooled = torch.randn(B, cfg.pooled_dim, generator=g)
    guidance = torch.full((B,), 3.5) if getattr(cfg, "guidance_embed", False) else None
    return x, sigma, ctx, pooled, guidance


# ---- a tiny model with a planted massive channel ----------------------------------------------

MA_TINY = {
    "sd3": ("sd3.5-medium", dict(num_layers=4, num_heads=2, head_dim=32, context_dim=32, pooled_dim=24)),
    "flux": ("flux.1-dev", dict(num_double=2, num_single=2, num_heads=2, head_dim=32, axes_dim=(8, 12, 12),
                                context_dim=32, pooled_dim=24)),
}
PLANTED = 41  # channel of the 64-wide hidden state
BIAS = 300.0  # typical |h| of the random model is ~1


def planted(family, plant=True):
    """A tiny model with a massive channel planted (PLANTED): a huge fc2 bias in the first block's image
    MLP, its gate opened to 1."""
    torch.manual_seed(0)
    name, kw = MA_TINY[family]
    model = mmdit.build_transformer(name, **kw).eval()
    if plant:
        D = model.config.hidden_size
        if family == "sd3":
            fc2, ada = model.joint_blocks[0].x_block.mlp.fc2, model.joint_blocks[0].x_block.adaLN_modulation[1]
        else:
            fc2, ada = model.double_blocks[0].img_mlp[2], model.double_blocks[0].img_mod.lin
        with torch.no_grad():
            fc2.bias[PLANTED] = BIAS
            ada.weight[5 * D + PLANTED] = 0.0  # gate_mlp is the 6th chunk
            ada.bias[5 * D + PLANTED] = 1.0
    return model


# ---- a stand-in model and the sampler's reference loop -----------------------------------------

class FakeModel:
    """A nonlinear stand-in with the model's signature; ``disrupt`` / ``fork`` rows use a
    different ("degraded") function, forked rows are appended after the batch."""

    ma = mmdit.MASpec(channels=(0,), block=0)

    def __init__(self, C=4, L=3, Dc=5, Dp=6):
        g = torch.Generator().manual_seed(0)
        self.wc = torch.randn(Dc, C, generator=g)
        self.wp = torch.randn(Dp, C, generator=g)

    def __call__(self, x, sigma, context, pooled, guidance=None, disrupt=None, fork=None):
        bias = context.mean(1) @ self.wc + pooled @ self.wp  # (B, C)
        g = 0.0 if guidance is None else guidance[:, None, None, None]
        v = torch.tanh(x * (1 + sigma[:, None, None, None]) + bias[:, :, None, None]) + 0.1 * g
        degraded = 0.5 * v + 0.2 * x.roll(1, dims=-1)
        if disrupt is not None:
            return torch.where(disrupt[:, None, None, None], degraded, v)
        if fork is not None:
            return torch.cat([v, degraded[fork]])
        return v


class Recorder:
    """Counts calls and records each call's batch size and fork mask."""

    def __init__(self, model):
        self.model, self.calls = model, []

    @property
    def ma(self):
        return self.model.ma

    def __call__(self, x, sigma, context, pooled, guidance=None, disrupt=None, fork=None, **kw):
        self.calls.append((x.shape[0], fork))
        return self.model(x, sigma, context, pooled, guidance=guidance, disrupt=disrupt, fork=fork, **kw)


def reference_velocity(model, x, s, cond, uncond, cfg, dg, cfg_interval=(0, 1), dg_interval=(0, 1), guidance=None):
    """The guided velocity from separate cond / uncond / disrupted calls (intervals in float32)."""
    B = x.shape[0]
    cfg_interval, dg_interval = [[torch.tensor(float(v)).item() for v in iv] for iv in (cfg_interval, dg_interval)]
    s = torch.tensor(float(s)).item()
    g = None if guidance is None else torch.full((B,), float(guidance))
    sig = torch.full((B,), s)
    v_c = model(x, sig, cond["context"], cond["pooled"], guidance=g)
    v = v_c
    if uncond is not None and cfg != 1 and cfg_interval[0] <= s <= cfg_interval[1]:
        v_u = model(x, sig, uncond["context"], uncond["pooled"], guidance=g)
        v = v_u + cfg * (v_c - v_u)
    if dg != 0 and dg_interval[0] <= s <= dg_interval[1]:
        v_m = model(x, sig, cond["context"], cond["pooled"], guidance=g, disrupt=torch.ones(B, dtype=torch.bool))
        v = v + dg * (v_c - v_m)
    return v


def reference_loop(model, x, sigmas, cond, uncond, cfg, dg, cfg_interval=(0, 1), dg_interval=(0, 1),
                   guidance=None):
    """Euler steps on ``reference_velocity``, by hand."""
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        x = x + (s_next - s) * reference_velocity(model, x, s, cond, uncond, cfg, dg, cfg_interval, dg_interval,
                                                  guidance)
    return x


def conds(B, L, Dc, Dp, seed=1):
    g = torch.Generator().manual_seed(seed)
    cond = {"context": torch.randn(B, L, Dc, generator=g), "pooled": torch.randn(B, Dp, generator=g)}
    uncond = {"context": torch.randn(B, L, Dc, generator=g), "pooled": torch.randn(B, Dp, generator=g)}
    return cond, uncond


# ---- perturbed copies of a model, block by block ---------------------------------------------

def skipped(model, layers):
    """A copy of ``model`` whose listed blocks return their input."""
    model = copy.deepcopy(model)
    blocks = list(model.joint_blocks) if model.config.family == "sd3" else \
        [*model.double_blocks, *model.single_blocks]
    for i in layers:
        block = blocks[i]
        if model.config.family == "sd3":
            last = block.context_block.pre_only
            block.forward = lambda ctx, x, c, rows=None, last=last: (None if last else ctx, x)
        elif i < model.config.num_double:
            block.forward = lambda img, txt, *rest, rows=None: (img, txt)
        else:
            block.forward = lambda x, *rest, rows=None: x
    return model


def identity_everywhere(model, layers, rows):
    """A copy of ``model`` whose listed blocks give every one of its ``rows`` rows identity attention."""
    model = copy.deepcopy(model)
    blocks = list(model.joint_blocks) if model.config.family == "sd3" else \
        [*model.double_blocks, *model.single_blocks]
    for i in layers:
        original = blocks[i].forward
        blocks[i].forward = lambda *args, original=original, **kw: original(*args, rows=BlockRows(((0, rows),)))
    return model


def one_graph(fn, *args, **kwargs):
    """``torch._dynamo.explain``: ``fn(*args, **kwargs)`` traces with no graph break, as one graph."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(*args, **kwargs)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def compile_whole(fn, *args, backend="aot_eager", **kwargs):
    """``fn(*args, **kwargs)`` compiled as one graph, and its output. ``fullgraph=True`` raises on
    any graph break and the counting backend asserts a single graph: what ``torch._dynamo.explain``
    proves (no break, one graph), in one trace instead of explain's plus the compile's."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    out = torch.compile(fn, fullgraph=True, backend=counter)(*args, **kwargs)
    assert counter.frame_count == 1, f"{counter.frame_count} graphs"
    return out
