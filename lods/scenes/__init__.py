"""Differentiable scenes: Gaussian splats, NeRF, and the 2D image."""
