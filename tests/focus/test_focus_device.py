"""The focus maths and the losses give the same answers on a CUDA device as on the CPU (skipped without one)."""

from __future__ import annotations

import pytest
import torch

from focusdpo.config import FocusConfig
from focusdpo.focus import complexity_map, focus_weights, match_subjects, pool_to_tokens, subject_top_k
from focusdpo.losses import objective_loss, token_errors

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _inputs(device: str, dtype: torch.dtype) -> dict:
    gen = torch.Generator().manual_seed(0)
    b, n, m, d = 2, 64, 16, 32
    masks = torch.zeros(b, 2, 16, 16)
    masks[:, 0, 2:8, 2:10] = 1
    masks[:, 1, 9:15, 6:14] = 1
    x = {
        "images": torch.rand(b, 3, 16, 16, generator=gen),
        "tgt": torch.randn(b, n, d, generator=gen),
        "refs": [torch.randn(b, m, d, generator=gen) for _ in range(2)],
        "ref_masks": [(torch.rand(b, m, generator=gen) < 0.5).float().index_fill(1, torch.tensor([0]), 1.0)
                      for _ in range(2)],
        "regions": pool_to_tokens(masks, 2).flatten(2),
        "pred": torch.randn(4, b, n, 8, generator=gen),
    }
    out = {}
    for key, value in x.items():
        if isinstance(value, list):
            out[key] = [v.to(device, dtype) for v in value]
        else:
            out[key] = value.to(device, torch.float64 if key == "images" else dtype)
    return out


def _run(device: str, dtype: torch.dtype) -> dict:
    x = _inputs(device, dtype)
    m_d = complexity_map(x["images"], 2).flatten(1).to(dtype)
    matches, scores = match_subjects(x["tgt"], x["refs"], x["ref_masks"], subject_top_k(x["regions"], 1.0))
    w, stats = focus_weights(matches, x["regions"], m_d, FocusConfig())
    target = torch.zeros_like(x["pred"][0])
    errs = [token_errors(p, target) for p in x["pred"]]
    loss, _ = objective_loss("focusdpo", *errs, weights=w, beta=100.0)
    return {"m_d": m_d, "matches": matches, "scores": scores, "w": w, "a": stats["a"], "loss": loss}


def test_cuda_matches_cpu() -> None:
    cpu, gpu = _run("cpu", torch.float32), _run("cuda", torch.float32)
    assert all(v.device.type == "cuda" for v in gpu.values())
    assert torch.equal(cpu["matches"], gpu["matches"].cpu())
    for key in ("m_d", "scores", "w", "a", "loss"):
        torch.testing.assert_close(gpu[key].cpu(), cpu[key], atol=1e-4, rtol=1e-4)


def test_cuda_bfloat16_runs_and_keeps_the_invariants() -> None:
    out = _run("cuda", torch.bfloat16)
    assert out["w"].dtype == torch.bfloat16
    torch.testing.assert_close(out["w"].float().mean(dim=1), torch.ones(2, device="cuda"), atol=2e-2, rtol=0)
    assert torch.isfinite(out["loss"]).all()
