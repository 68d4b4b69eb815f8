"""Flow-matching sigma schedules, the solvers (Euler, Heun, DPM++ 2M) and batched guidance
(CFG, DG, SLG, PAG, CFG-Zero*, APG)."""
from .euler import sample
from .guidance import APG, Guidance, GuidanceState, guided_velocity
from .schedules import SCHEDULES, flux_mu, flux_seq_len, flux_sigmas, sd3_sigmas
from .solvers import SAMPLERS

__all__ = ["sample", "APG", "Guidance", "GuidanceState", "guided_velocity", "sd3_sigmas", "flux_sigmas", "flux_mu",
           "flux_seq_len", "SAMPLERS", "SCHEDULES"]
