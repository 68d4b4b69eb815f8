"""Flow-matching sigma schedules, the solvers (Euler, Heun, DPM++ 2M) and batched CFG / DG guidance."""
from .euler import sample
from .guidance import Guidance, guided_velocity
from .schedules import SCHEDULES, flux_mu, flux_seq_len, flux_sigmas, sd3_sigmas
from .solvers import SAMPLERS

__all__ = ["sample", "Guidance", "guided_velocity", "sd3_sigmas", "flux_sigmas", "flux_mu", "flux_seq_len",
           "SAMPLERS", "SCHEDULES"]
