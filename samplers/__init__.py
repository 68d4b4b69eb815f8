"""Flow-matching sigma schedules, the Euler loop and batched guidance (CFG, DG, SLG, PAG, CFG-Zero*, APG)."""
from .euler import sample
from .guidance import APG, Guidance, GuidanceState, guided_velocity
from .schedules import flux_mu, flux_seq_len, flux_sigmas, sd3_sigmas

__all__ = ["sample", "APG", "Guidance", "GuidanceState", "guided_velocity", "sd3_sigmas", "flux_sigmas", "flux_mu",
           "flux_seq_len"]
