"""Adaptive focus of FocusDPO: SPAF correspondence, DPCE complexity and the dynamic weights (DESIGN 2.3-2.5)."""

from focusdpo.focus.complexity import complexity_map, gaussian_blur, pool_to_tokens
from focusdpo.focus.correspondence import (
    READOUTS,
    claim_tokens,
    cosine_scores,
    match_subjects,
    pool_subjects,
    readout_scores,
    subject_top_k,
)
from focusdpo.focus.weights import focus_sets, focus_weights

__all__ = [
    "READOUTS",
    "claim_tokens",
    "cosine_scores",
    "readout_scores",
    "complexity_map",
    "focus_sets",
    "focus_weights",
    "gaussian_blur",
    "match_subjects",
    "pool_subjects",
    "pool_to_tokens",
    "subject_top_k",
]
