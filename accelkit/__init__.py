"""accelkit: make trained diffusion and flow-matching checkpoints fast."""

__version__ = "0.1.0"
