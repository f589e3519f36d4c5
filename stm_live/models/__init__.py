"""Learned reconstruction: architecture, normalisation, training and shipped weights."""
