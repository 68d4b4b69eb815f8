"""Flow-matching sigma schedules, the Euler loop and batched CFG / DG guidance."""
from .euler import sample
from .guidance import Guidance, guided_velocity
from .schedules import flux_mu, flux_seq_len, flux_sigmas, sd3_sigmas

__all__ = ["sample", "Guidance", "guided_velocity", "sd3_sigmas", "flux_sigmas", "flux_mu", "flux_seq_len"]
