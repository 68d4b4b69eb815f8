"""Flow-matching sigma schedules, the solvers (Euler, Heun, DPM++ 2M) and batched guidance
(CFG, DG, SLG, PAG, CFG-Zero*, APG), every setting in one ``Guidance``.

    guide.py      Guidance and APG: the settings (no torch; the CLI's flags come from them)
    guidance.py   one step's guided velocity from one batched model call
    solvers.py    Euler, Heun, DPM++ 2M over a list of sigmas
    euler.py      ``sample()``: the solver, the guidance and the model together
    schedules.py  the sigma schedules (SD3 shift, FLUX / Qwen-Image dynamic shift, FLUX.2 empirical mu,
                  beta / Karras / exponential)

The names below are imported on first use, so ``mmdit.samplers.guide`` loads without torch.
"""
from .. import lazy_names

_PUBLIC = {"sample": ".euler", "APG": ".guide", "Guidance": ".guide", "default_layers": ".guide",
           "GuidanceState": ".guidance", "guided_velocity": ".guidance", "SCHEDULES": ".schedules",
           "flux_mu": ".schedules", "flux_seq_len": ".schedules", "flux_sigmas": ".schedules",
           "flux2_mu": ".schedules", "flux2_sigmas": ".schedules", "qwen_image_sigmas": ".schedules",
           "sd3_sigmas": ".schedules", "SAMPLERS": ".solvers"}
__all__ = list(_PUBLIC)
__getattr__, __dir__ = lazy_names(__name__, _PUBLIC)
