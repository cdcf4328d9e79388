"""Evaluation: the toy benchmark (metrics: :mod:`focusdpo.world.metrics`), the DreamBench protocol and reports."""
