"""The MA analysis as a user feature: a JSON report and PNG plots of the paper's figures.

``analyze`` probes a model on noisy latents indexed by (prompt, sigma) and reports where
the massive channels are, how their magnitude moves with sigma (prompt fixed) and with the
prompt (sigma fixed), cond vs uncond rows, the adaLN gate alpha of the MLP residual vs the
hidden state in the MA channel, and the random-channel control. ``run_analyze`` /
``run_calibrate`` build those latents along Euler trajectories (what the CLI calls).
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..samplers import Guidance, flux2_sigmas, flux_seq_len, flux_sigmas, qwen_image_sigmas, sample, sd3_sigmas
from ..samplers.guidance import same_length
from .calibrate import Calibration, ablation_effects, find_massive, select_massive
from .probe import Activations, named_inputs, probe
from .spec import default_block


def _mean_rows(rec: Activations) -> dict[str, torch.Tensor]:
    """Average the rows of a probe record: field -> (K, D)."""
    return {f: getattr(rec, f).mean(1) for f in ("image_mean", "image_signed", "text_mean", "gate")}


def as_inputs(model: nn.Module, c) -> dict:
    """Encoded conditioning as the model's keyword inputs: a dict (``Pipeline.encode``'s form),
    or a tuple of positional inputs (``(context, pooled)`` for SD3 / FLUX.1)."""
    if isinstance(c, Mapping):
        return dict(c)
    return named_inputs(model, tuple(c))


def _split(model: nn.Module, value) -> tuple[torch.Tensor, dict]:
    """A sample value ``(x, *inputs[, named])`` -> (x, keyword inputs)."""
    x, *rest = value
    named = rest.pop() if rest and isinstance(rest[-1], Mapping) else {}
    return x, named_inputs(model, rest, named)


def _stack(u, c, B: int):
    """uncond's input (1 or B rows) then cond's, as one batch; numbers and None stay as they are."""
    if not torch.is_tensor(c) or c.dim() == 0:
        return c
    u = torch.as_tensor(u, dtype=c.dtype, device=c.device).reshape(-1, *c.shape[1:]) if u is not None else c
    return torch.cat([u.expand(B, *c.shape[1:]), c])


@torch.no_grad()
def collect(model: nn.Module, samples: Mapping, uncond=None) -> dict:
    """Probe every (prompt, sigma) sample as one batch [uncond | cond]: key -> {"cond", "uncond"}."""
    un = None if uncond is None else as_inputs(model, uncond)
    out = {}
    for key, value in samples.items():
        x, inputs = _split(model, value)
        B, sigma = x.shape[0], float(key[1])
        if un is not None:
            x = x.repeat(2, 1, 1, 1)
            inputs, u = same_length(inputs, un)  # texts of different lengths: the shorter padded, masked
            inputs = {k: _stack(u.get(k), v, B) for k, v in inputs.items()}
        rec = probe(model, x, torch.full((x.shape[0],), sigma, device=x.device), **inputs)
        out[key] = {"cond": _mean_rows(rec.rows(slice(x.shape[0] - B, None)))}
        if un is not None:
            out[key]["uncond"] = _mean_rows(rec.rows(slice(0, B)))
    return out


def _spread(grid: torch.Tensor) -> dict:
    """How much a (prompts, sigmas) grid moves with the prompt vs with sigma: the mean over
    sigmas of the std across prompts, and the mean over prompts of the std across sigmas."""
    return {"mean": grid.mean().item(),
            "std_over_prompts": grid.std(0, unbiased=False).mean().item(),
            "std_over_sigmas": grid.std(1, unbiased=False).mean().item()}


def analyze(model: nn.Module, samples: Mapping, out_dir, *, uncond=None,
            block: int | None = None, channels=None, ratio: float | None = 50.0,
            absolute: float | None = None, top_k: int | None = 8, control: bool = True,
            plots: bool = True) -> dict:
    """Write ``ma_report.json`` (and PNG figures) to ``out_dir``; return the report.

    samples: {(prompt, sigma): (x, *inputs[, named inputs])} with x (B, C, H, W) the noisy
        latents at that sigma and the prompt's inputs as the model takes them (SD3 / FLUX.1:
        context, pooled[, guidance]); the same prompts at every sigma and vice versa.
    uncond: the negative / empty prompt's inputs (a tuple or a dict), probed as extra rows.
    channels: MA channels to follow (default: those ``ma.select_massive`` flags at block m).
    """
    out_dir = Path(out_dir)
    m = default_block(model.config) if block is None else block
    stats = collect(model, samples, uncond)
    keys = list(stats)
    prompts = list(dict.fromkeys(k[0] for k in keys))
    sigmas = sorted({float(k[1]) for k in keys}, reverse=True)
    mag = {b: torch.stack([stats[k][b]["image_mean"] for k in keys]).mean(0)
           for b in (("cond", "uncond") if uncond is not None else ("cond",))}
    flagged = {b: select_massive(v, ratio, absolute, top_k) for b, v in mag.items()}
    if channels is None:
        channels = flagged["cond"][m].channels or [int(mag["cond"][m].argmax())]
        found = bool(flagged["cond"][m].channels)
    else:
        channels, found = [int(c) for c in channels], True
    c0 = channels[0]

    def series(branch, field, k, c):  # value per (prompt, sigma) key
        return {key: stats[key][branch][field][k, c].item() for key in keys if branch in stats[key]}

    report = {
        "model": {"family": model.config.family, "blocks": model.config.total_blocks,
                  "hidden_size": model.config.hidden_size},
        "block": m, "channels": channels, "found_by_rule": found,
        "rule": {"ratio": ratio, "absolute": absolute, "top_k": top_k,
                 "statistic": "mean |h| over image tokens, block output"},
        "prompts": prompts, "sigmas": sigmas,
        "per_block": [{"block": k, **{b: {"channels": f[k].channels, "magnitude": f[k].magnitude,
                                          "ratio": f[k].ratio, "median": f[k].median}
                                      for b, f in flagged.items()}} for k in range(len(flagged["cond"]))],
    }
    # magnitude of the MA at block m vs sigma (prompt fixed) and vs prompt (sigma fixed)
    grid = torch.full((len(prompts), len(sigmas)), float("nan"))
    gate = torch.full_like(grid, float("nan"))
    for key, val in series("cond", "image_mean", m, c0).items():
        grid[prompts.index(key[0]), sigmas.index(float(key[1]))] = val
        gate[prompts.index(key[0]), sigmas.index(float(key[1]))] = stats[key]["cond"]["gate"][m, c0].item()
    report["vs_sigma_and_prompt"] = {"channel": c0, "magnitude": grid.tolist(), "gate": gate.tolist(),
                                     "rows": "prompts", "cols": "sigmas"}
    report["variation"] = {"magnitude": _spread(grid), "gate": _spread(gate)}
    by_sigma = {b: [sum(stats[k][b]["image_mean"][m, c0].item() for k in keys if float(k[1]) == s)
                    / len(prompts) for s in sigmas] for b in mag}
    report["cond_vs_uncond"] = {"channel": c0, "block": m, "sigmas": sigmas, **by_sigma,
                                "per_block": {b: mag[b][:, c0].tolist() for b in mag}}
    mean_over = {f: torch.stack([stats[k]["cond"][f] for k in keys]).mean(0) for f in ("gate", "image_signed")}
    report["gate_vs_hidden"] = {"channel": c0, "gate": mean_over["gate"][:, c0].tolist(),
                                "hidden": mean_over["image_signed"][:, c0].tolist(),
                                "gate_abs_median_channel": mean_over["gate"].abs().median(1).values.tolist()}
    if control:
        report["control"] = _control(model, samples, keys[0], channels, m)
    out_dir.mkdir(parents=True, exist_ok=True)  # only now: a run stopped while probing leaves no folder
    if plots:
        report["figures"] = _plot(report, mag, mean_over, out_dir)
    (out_dir / "ma_report.json").write_text(json.dumps(report, indent=1))
    return report


def _control(model, samples, key, channels, m, draws: int = 3) -> dict:
    """Zeroing the MA channels at block m vs as many random non-MA channels (reviewers' control)."""
    x, inputs = _split(model, samples[key])
    sample_ = (x, float(key[1]), inputs)
    gen = torch.Generator().manual_seed(0)
    others = [c for c in torch.randperm(model.config.hidden_size, generator=gen).tolist() if c not in channels]
    controls = [others[i * len(channels):(i + 1) * len(channels)] for i in range(draws)]
    effect, *random = ablation_effects(model, sample_, [channels, *controls], m)
    return {"sample": list(key), "ma_channels": effect, "random_channels": random,
            "statistic": "|v_disrupted - v| / |v|"}


def _figure(ncols=1, nrows=1, size=(6.4, 4.0)):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("the MA plots need matplotlib: pip install 'mmdit-dg[plots]' "
                          "(or pass plots=False for the JSON report only)") from None
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False).ravel()


def _plot(report, mag, mean_over, out_dir: Path) -> list[str]:
    m, c0, channels = report["block"], report["channels"][0], report["channels"]
    sigmas, prompts = report["sigmas"], report["prompts"]
    grid = torch.tensor(report["vs_sigma_and_prompt"]["magnitude"])
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        written.append(name)

    # 1. per-channel magnitude per block
    fig, (ax0, ax1) = _figure(2)
    im = ax0.imshow(mag["cond"].clamp_min(1e-6).log10().numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
    fig.colorbar(im, ax=ax0, label="log10 mean |h| (image tokens)")
    ax0.set(xlabel="channel", ylabel="block (output)", title="per-channel magnitude, cond rows")
    ax0.yaxis.get_major_locator().set_params(integer=True)
    ax1.plot(mag["cond"][m].numpy(), lw=0.8)
    for c in channels:
        ax1.annotate(str(c), (c, mag["cond"][m, c].item()), color="C3")
    ax1.set(yscale="log", xlabel="channel", ylabel="mean |h|", title=f"block {m}")
    save(fig, "channel_magnitude.png")
    # 2. vs sigma (prompt fixed) and 3. vs prompt (sigma fixed)
    fig, (ax0, ax1) = _figure(2)
    for i, p in enumerate(prompts):
        ax0.plot(sigmas, grid[i].numpy(), marker=".", label=p[:30])
    ax0.set(xlabel="sigma", ylabel=f"mean |h| ch {c0}", title=f"MA vs sigma, block {m}")
    ax0.invert_xaxis()
    if len(prompts) <= 10:
        ax0.legend(fontsize=7)
    for j, s in enumerate(sigmas):
        ax1.plot(range(len(prompts)), grid[:, j].numpy(), marker="o", label=f"sigma {s:.3f}")
    ax1.set(xlabel="prompt", ylabel=f"mean |h| ch {c0}", title="MA vs prompt (sigma fixed)")
    ax1.set_xticks(range(len(prompts)), [p[:12] for p in prompts], rotation=30, fontsize=7)
    ax0.ticklabel_format(axis="y", useOffset=False)
    ax1.ticklabel_format(axis="y", useOffset=False)
    if len(sigmas) <= 10:
        ax1.legend(fontsize=7)
    save(fig, "ma_vs_sigma_and_prompt.png")
    # 4. cond vs uncond rows
    cvu = report["cond_vs_uncond"]
    fig, (ax0, ax1) = _figure(2)
    for b in mag:
        ax0.plot(sigmas, cvu[b], marker=".", label=b)
        ax1.plot(cvu["per_block"][b], marker=".", label=b)
    ax0.set(xlabel="sigma", ylabel=f"mean |h| ch {c0}", title=f"cond vs uncond, block {m}")
    ax0.invert_xaxis()
    ax1.set(xlabel="block", ylabel=f"mean |h| ch {c0}", yscale="log", title="cond vs uncond, per block")
    ax0.legend(), ax1.legend()
    save(fig, "cond_vs_uncond.png")
    # 5. gate alpha vs hidden state in the MA channel
    gv = report["gate_vs_hidden"]
    fig, (ax0, ax1, ax2) = _figure(3)
    ax0.plot(gv["gate"], marker=".", color="C0", label=f"alpha ch {c0}")
    ax0.plot(gv["gate_abs_median_channel"], ls="--", color="C0", alpha=0.5, label="median |alpha|")
    ax0.set(xlabel="block", ylabel="gate alpha", title="MLP gate vs hidden state")
    ax0.legend(fontsize=7, loc="upper left")
    twin = ax0.twinx()
    twin.plot(gv["hidden"], marker="x", color="C3")
    twin.set_ylabel(f"mean h ch {c0}", color="C3")
    twin.ticklabel_format(axis="y", useOffset=False)
    ax1.plot(mean_over["gate"][m].numpy(), lw=0.8)
    ax1.set(xlabel="channel", ylabel="gate alpha", title=f"gate over channels, block {m}")
    gate = torch.tensor(report["vs_sigma_and_prompt"]["gate"])
    for i, p in enumerate(prompts):
        ax2.plot(sigmas, gate[i].numpy(), marker=".", label=p[:30])
    ax2.set(xlabel="sigma", ylabel=f"alpha ch {c0}", title=f"gate vs sigma, block {m}")
    ax2.invert_xaxis()
    save(fig, "gate_vs_hidden.png")
    return written


# ---------------------------------------------------------------------------------------------
# From prompts: noisy latents along Euler trajectories (what `mmdit analyze-ma` / `calibrate-ma` run)

def default_sigmas(model: nn.Module, steps: int, height: int, width: int) -> torch.Tensor:
    """The family's schedule for an image of height x width pixels (FLUX-dev and Chroma shifted, schnell not;
    FLUX.2 its empirical mu, one token per 16 x 16 pixels as FLUX.1's packed latents; Qwen-Image its own
    shift, for its 1024 tokens per megapixel: 2x2 latents of its 8x VAE, or 2.1's 16x)."""
    family = model.config.family
    if family == "sd3":
        return sd3_sigmas(steps)
    if family == "flux2":
        return flux2_sigmas(steps, flux_seq_len(height, width))
    if family in ("qwen-image", "qwen-image-2.1"):
        return qwen_image_sigmas(steps, flux_seq_len(height, width))
    return flux_sigmas(steps, flux_seq_len(height, width),
                       shift=getattr(model.config, "guidance_embed", True))


def _latent_shape(model: nn.Module, height: int, width: int) -> tuple[int, int, int]:
    """(C, h, w) of a family's latents: 16 channels at 1/8 (Qwen-Image: its latent channels); FLUX.2's
    patchified channels and 2.1's at 1/16."""
    if model.config.family == "flux2":
        return model.config.in_channels, math.ceil(height / 16), math.ceil(width / 16)
    c = getattr(model.config, "latent_channels", 16)
    if model.config.family == "qwen-image-2.1":
        return c, math.ceil(height / 16), math.ceil(width / 16)
    return c, 2 * math.ceil(height / 16), 2 * math.ceil(width / 16)


@torch.no_grad()
def trajectory_samples(model: nn.Module, conds: Mapping, sigmas, *, height: int = 1024, width: int = 1024,
                       seed: int = 0, uncond=None, cfg: float = 1.0,
                       guidance: float | None = None, every: int = 1, latent_shape: tuple | None = None) -> dict:
    """{(prompt, sigma): (x, *inputs)} along one Euler trajectory per prompt.

    conds: {prompt: the prompt's inputs}, a tuple of positional inputs ((context (1, L, Dc),
    pooled (1, Dp)) for SD3 / FLUX.1) or a dict (``Pipeline.encode``); uncond likewise, for CFG
    along the trajectory (cfg != 1). The same seeded noise for every prompt, so prompts are the
    only difference at a given sigma. ``every``: keep every n-th step. ``guidance``: FLUX's
    distilled guidance, kept with each sample. latent_shape: (C, h, w) of the latents (default:
    16 channels at height/8 x width/8; FLUX.2: its 128 patchified channels at height/16 x width/16;
    Qwen-Image 2.1: 64 at height/16 x width/16).
    """
    param = next(model.parameters())
    shape = (1, *(latent_shape or _latent_shape(model, height, width)))
    sigmas = [float(s) for s in sigmas]
    un = None if uncond is None else as_inputs(model, uncond)
    out = {}
    for prompt, c in conds.items():
        cond = as_inputs(model, c)
        kept = (*c, *(() if guidance is None else (guidance,))) if not isinstance(c, Mapping) else \
            ({**cond, "guidance": guidance} if guidance is not None else cond,)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(param.device, param.dtype)
        for i in range(len(sigmas) - 1):
            if i % every == 0:
                out[(prompt, sigmas[i])] = (x, *kept)
            x = sample(model, x, sigmas[i:i + 2], cond, un, guide=Guidance(cfg=cfg), guidance=guidance)
    return out


def run_analyze(model: nn.Module, conds: Mapping, out_dir, *, steps: int = 28, height: int = 1024,
                width: int = 1024, seed: int = 0, uncond=None, cfg: float = 1.0,
                guidance: float | None = None, every: int = 1, sigmas=None, latent_shape=None,
                **analyze_kw) -> dict:
    """Prompts -> trajectories -> ``analyze``. conds / uncond: encoded prompts (see
    trajectory_samples); uncond (the empty prompt) is always probed, used for CFG if cfg != 1.
    sigmas: the schedule (default: ``default_sigmas``; a pipeline passes ``pipe.sigmas(...)``)."""
    sigmas = default_sigmas(model, steps, height, width) if sigmas is None else sigmas
    samples = trajectory_samples(model, conds, sigmas, height=height, width=width, seed=seed,
                                 uncond=uncond, cfg=cfg, guidance=guidance, every=every, latent_shape=latent_shape)
    return analyze(model, samples, out_dir, uncond=uncond, **analyze_kw)


def calibration_samples(model: nn.Module, conds: Mapping, *, steps: int = 28, height: int = 1024, width: int = 1024,
                        seed: int = 0, guidance: float | None = None, every: int = 4, sigmas=None,
                        latent_shape=None) -> list:
    """Cond-only trajectories of the prompts as calibration samples ``(x, sigma, *inputs)``."""
    sigmas = default_sigmas(model, steps, height, width) if sigmas is None else sigmas
    samples = trajectory_samples(model, conds, sigmas, height=height, width=width, seed=seed,
                                 guidance=guidance, every=every, latent_shape=latent_shape)
    return [(x, s, *inputs) for (_, s), (x, *inputs) in samples.items()]


def run_calibrate(model: nn.Module, conds: Mapping, *, key: str | None = None, steps: int = 28,
                  height: int = 1024, width: int = 1024, seed: int = 0, guidance: float | None = None,
                  every: int = 4, sigmas=None, latent_shape=None, **rule) -> Calibration:
    """Prompts -> cond-only trajectories -> ``find_massive``; saved under ``key`` if given
    (``checkpoint_hash(weights)``, which the loader's ``spec_for_checkpoint`` looks up)."""
    from .cache import save_spec

    rows = calibration_samples(model, conds, steps=steps, height=height, width=width, seed=seed, guidance=guidance,
                               every=every, sigmas=sigmas, latent_shape=latent_shape)
    cal = find_massive(model, rows, **rule)
    if key is not None:
        save_spec(cal.spec, key, calibration=cal)
    return cal
