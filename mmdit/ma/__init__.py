"""Massive activations (MAs): the disruption spec, the probe, calibration, the cache, the policy, the report.

    spec.py       MASpec (channels, fork block m, rho, streams, token mask); the paper's channels
    probe.py      per block, per stream, per channel |h| at every block's output
    calibrate.py  which channels are massive; ``find_massive`` -> a ``Calibration`` and its spec
    cache.py      one JSON per checkpoint, keyed by a content hash of its files
    policy.py     the one policy: ``find_spec`` / ``ensure_spec`` (paper channels checked, else calibrated)
    report.py     ``mmdit analyze-ma``'s JSON report and plots (imported on its own: matplotlib)
"""
from .cache import cache_dir, checkpoint_hash, load_spec, save_spec, spec_for_checkpoint
from .calibrate import BlockMA, Calibration, ablation_effect, ablation_effects, calibrate, find_massive, \
    massive_block, select_massive
from .policy import Found, ensure_spec, find_spec
from .probe import Activations, Probe, channel_ratios, probe
from .spec import PAPER_CHANNELS, MASpec, default_block, paper_channels, spec_from_json, spec_to_json

__all__ = ["MASpec", "default_block", "PAPER_CHANNELS", "paper_channels", "spec_to_json", "spec_from_json",
           "Activations", "Probe", "probe", "channel_ratios", "BlockMA", "Calibration", "select_massive",
           "massive_block", "find_massive", "calibrate", "ablation_effects", "ablation_effect", "cache_dir",
           "checkpoint_hash", "save_spec", "load_spec", "spec_for_checkpoint", "Found", "find_spec", "ensure_spec"]
