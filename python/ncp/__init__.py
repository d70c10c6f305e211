"""ncp: preference alignment of text-to-image diffusion models in noise-conditioned perceptual space."""
__version__ = "0.1.0"
