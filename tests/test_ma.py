"""MA probe, calibration on a planted massive channel, the random-channel control, the cache."""
import json

import pytest
import torch

import mmdit
from helpers import MA_TINY, PLANTED, planted
from mmdit import ma


def samples(model, n=3, B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    out = []
    for i in range(n):
        x = torch.randn(B, 16, 8, 8, generator=g)
        sigma = torch.linspace(0.2, 0.9, B) * (i + 1) / n
        ctx, pooled = torch.randn(B, 5, cfg.context_dim, generator=g), torch.randn(B, cfg.pooled_dim, generator=g)
        out.append((x, sigma, ctx, pooled) + ((torch.full((B,), 3.5),) if cfg.family == "flux" else ()))
    return out


@pytest.mark.parametrize("family", sorted(MA_TINY))
def test_probe_shapes_and_gate(family):
    model = planted(family)
    x, sigma, ctx, pooled, *g = samples(model, n=1)[0]
    rec = ma.probe(model, x, sigma, ctx, pooled, *g)
    K, D = model.config.total_blocks, model.config.hidden_size
    assert rec.image_mean.shape == rec.image_max.shape == rec.gate.shape == (K, 2, D)
    assert torch.equal(rec.sigma, sigma)
    assert (rec.image_max >= rec.image_mean).all()
    assert torch.allclose(rec.gate[0, :, PLANTED], torch.ones(2))  # the planted open gate
    assert rec.image_mean[:, :, PLANTED].min() > 100  # present at every block output
    if family == "sd3":
        assert rec.text_mean[-1].isnan().all() and not rec.text_mean[:-1].isnan().any()  # last: no context out
    else:
        assert not rec.text_mean.isnan().any()
    # hooks are removed afterwards and the probe does not change the output
    with torch.no_grad():
        assert all(not m._forward_hooks for m in model.modules())
    assert rec.rows(slice(0, 1)).image_mean.shape == (K, 1, D)


@pytest.mark.parametrize("family", sorted(MA_TINY))
def test_calibrate_finds_planted_channel_and_control(family):
    model = planted(family)
    cal = ma.find_massive(model, samples(model))
    m = ma.default_block(model.config)
    assert cal.spec.block == m and cal.spec.rho == 0.0
    assert cal.spec.channels[0] == PLANTED and len(cal.spec.channels) <= 2
    for b in cal.blocks:  # few channels flagged anywhere; the planted one at every block
        assert b.channels[0] == PLANTED and len(b.channels) <= 2 and b.ratio[0] > 50
    assert ma.calibrate(model, samples(model)) == cal.spec
    # reviewers' control: zeroing the MA at block m vs zeroing random non-MA channels
    sample = samples(model, n=1, seed=7)[0]
    effect = ma.ablation_effect(model, sample, [PLANTED], m)
    gen = torch.Generator().manual_seed(3)
    others = [c for c in torch.randperm(model.config.hidden_size, generator=gen).tolist() if c != PLANTED][:5]
    controls = [ma.ablation_effect(model, sample, [c], m) for c in others]
    assert effect > 0.3, effect
    assert effect > 10 * max(controls), (effect, controls)
    assert model.ma is None  # restored


def test_no_massive_channel_is_a_clear_error():
    model = planted("sd3", plant=False)
    with pytest.raises(ValueError, match="no massive channel at block 2"):
        ma.calibrate(model, samples(model, n=1))
    with pytest.raises(ValueError, match="rule"):
        ma.select_massive(torch.ones(2, 4), ratio=None, absolute=None)


def test_select_rules():
    mag = torch.ones(2, 10)
    mag[0, 3], mag[0, 7], mag[1, 2] = 80.0, 200.0, 30.0
    rows = ma.select_massive(mag, ratio=50)
    assert rows[0].channels == [7, 3] and rows[1].channels == []
    assert ma.select_massive(mag, ratio=50, top_k=1)[0].channels == [7]
    assert ma.select_massive(mag, ratio=None, absolute=25)[1].channels == [2]
    assert ma.select_massive(mag, ratio=50, absolute=100)[0].channels == [7]


def test_massive_block_is_the_default_or_the_nearest_with_mas():
    mag = torch.ones(5, 10)
    mag[4, 3] = 80.0  # only the last block has a massive channel (the long tiny run's case)
    assert ma.massive_block(ma.select_massive(mag, ratio=50), preferred=2) == 4
    mag[1, 5] = 60.0  # blocks 1 and 4: 1 is nearer to 2
    assert ma.massive_block(ma.select_massive(mag, ratio=50), preferred=2) == 1
    mag[3, 0] = 70.0  # blocks 1 and 3 tie: the later one
    assert ma.massive_block(ma.select_massive(mag, ratio=50), preferred=2) == 3
    mag[2, 9] = 55.0  # the default block has one: it stays
    assert ma.massive_block(ma.select_massive(mag, ratio=50), preferred=2) == 2
    assert ma.massive_block(ma.select_massive(torch.ones(5, 10), ratio=50), preferred=2) is None


def test_default_block():
    assert ma.default_block(mmdit.preset("flux.1-dev")) == 28
    assert ma.default_block(mmdit.preset("sd3-medium")) == 12
    assert ma.default_block(mmdit.preset("sd3.5-large")) == 19
    assert ma.default_block(mmdit.preset("flux.1-dev", num_double=1, num_single=2)) == 1


def test_cache_round_trip(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.setenv("MMDIT_CACHE", str(tmp_path / "cache"))
    ckpt = tmp_path / "model.safetensors"
    save_file({"a": torch.randn(300, 300), "b": torch.zeros(3)}, str(ckpt))
    key = ma.checkpoint_hash(ckpt)
    assert ma.checkpoint_hash([ckpt]) == key  # the file list a loaded model keeps
    assert ma.spec_for_checkpoint(ckpt) is None
    spec = mmdit.MASpec(channels=(154, 1446), block=28, rho=0.25)
    path = ma.save_spec(spec, key)
    assert path == tmp_path / "cache" / "ma" / f"{key}.json"
    assert ma.spec_for_checkpoint(ckpt) == spec == ma.spec_for_checkpoint(key) == ma.load_spec(key)
    assert ma.spec_for_checkpoint(tmp_path) == spec  # a folder holding the file
    # same shapes, other values (a fine-tune): another key
    save_file({"a": torch.randn(300, 300), "b": torch.zeros(3)}, str(ckpt))
    assert ma.checkpoint_hash(ckpt) != key and ma.spec_for_checkpoint(ckpt) is None
    with pytest.raises(ValueError, match="callable"):
        ma.save_spec(mmdit.MASpec(channels=(1,), block=0, rho=lambda s: s), key)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a safetensors"):
        ma.checkpoint_hash([bad])
    with pytest.raises(ValueError, match="not a readable safetensors"):  # the loader's own check
        ma.checkpoint_hash(bad)


def test_calibration_saved_with_table(tmp_path, monkeypatch):
    monkeypatch.setenv("MMDIT_CACHE", str(tmp_path))
    model = planted("flux")
    cal = ma.find_massive(model, samples(model, n=1), block=0, top_k=3)
    path = ma.save_spec(cal.spec, "k" * 64, calibration=cal)
    data = json.loads(path.read_text())
    assert data["calibration"]["blocks"][0]["channels"][0] == PLANTED
    assert ma.load_spec("k" * 64) == cal.spec
    assert f"{PLANTED} (" in cal.summary() and "<- fork block m" in cal.summary()


@pytest.mark.parametrize("family", sorted(MA_TINY))
def test_analysis_report_and_plots(family, tmp_path):
    pytest.importorskip("matplotlib")
    from mmdit.ma import report as ma_report

    model = planted(family)
    g = torch.Generator().manual_seed(5)
    cfg = model.config

    def enc():
        return torch.randn(1, 5, cfg.context_dim, generator=g), torch.randn(1, cfg.pooled_dim, generator=g)

    conds = {"a red fox": enc(), "a city at night": enc(),
             "a bowl of fruit": dict(zip(("context", "pooled"), enc()))}  # Pipeline.encode's form
    report = ma_report.run_analyze(model, conds, tmp_path, steps=4, height=64, width=64, uncond=enc(), cfg=3.0,
                                   guidance=3.5 if family == "flux" else None)
    assert report["channels"][0] == PLANTED and report["found_by_rule"]
    assert len(report["sigmas"]) == 4 and len(report["prompts"]) == 3
    assert all(b["cond"]["channels"][:1] == [PLANTED] and b["uncond"]["channels"][:1] == [PLANTED]
               for b in report["per_block"])
    assert report["control"]["ma_channels"] > 10 * max(report["control"]["random_channels"])
    assert report["gate_vs_hidden"]["gate"][0] == pytest.approx(1.0)
    saved = json.loads((tmp_path / "ma_report.json").read_text())
    assert saved["block"] == report["block"] and len(saved["figures"]) == 4
    for name in saved["figures"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_calibrate_saves(tmp_path, monkeypatch):
    from mmdit.ma import report as ma_report

    monkeypatch.setenv("MMDIT_CACHE", str(tmp_path))
    model = planted("sd3")
    conds = {"p": (torch.randn(1, 5, 32), torch.randn(1, 24))}
    cal = ma_report.run_calibrate(model, conds, key="abc", steps=4, height=64, width=64, every=2)
    assert cal.spec.channels == (PLANTED,) and cal.samples == 2
    assert ma.load_spec("abc") == cal.spec


def test_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    from mmdit.ma import report as ma_report

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    model = planted("sd3")
    x, sigma, ctx, pooled = samples(model, n=1)[0]
    with pytest.raises(ImportError, match="pip install"):
        ma_report.analyze(model, {("p", 0.5): (x, ctx, pooled)}, tmp_path, control=False)
    report = ma_report.analyze(model, {("p", 0.5): (x, ctx, pooled)}, tmp_path, control=False, plots=False)
    assert report["channels"] == [PLANTED]
