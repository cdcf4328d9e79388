"""Evaluation: toy metrics with ground truth (``toy_metrics``), the DreamBench protocol and reports."""
