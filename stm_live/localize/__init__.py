"""Atoms and lattices: peak finding, localization maps from stochastic reconstructions, and
Fourier lattice analysis (docs/localization.md)."""
