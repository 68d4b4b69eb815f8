"""Flow-matching sigma schedules, the Euler loop and batched CFG / DG guidance."""
