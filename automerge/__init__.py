"""automerge: Bayesian block-weight optimizer for Stable Diffusion checkpoint merges."""

__version__ = "0.1.0"
