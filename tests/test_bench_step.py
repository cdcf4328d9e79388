"""``benchmarks/bench_step.py --preset flux-dev-24gb`` (issue 17 point 4): a GPU preset that runs on a CPU at a tiny
size, and its block-by-block quantised build."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_step.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_step", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_step", module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_quantized_build_gives_int8_blocks_and_plain_embedders() -> None:
    pytest.importorskip("torchao")
    from focusdpo.quantization import quantization_of, quantized_linears

    bench = _bench()
    arch = {**bench.FLUX_DEV, "num_layers": 1, "num_single_layers": 1, "num_attention_heads": 1}
    tr = bench._quantized_transformer(arch, "int8", torch.device("cpu"), torch.float32)
    assert quantization_of(tr) == "int8"
    assert all(type(m.weight).__name__ != "Parameter" for _, m in quantized_linears(tr))
    assert type(tr.proj_out.weight) is torch.nn.Parameter and tr.proj_out.weight.device.type == "cpu"
    assert not any(p.is_meta for p in tr.parameters())
    assert float(tr.transformer_blocks[0].attn.norm_q.weight.mean()) == 1.0  # norm scales at 1, not random


@pytest.mark.slow
def test_flux_dev_24gb_preset_runs_on_the_cpu_at_a_tiny_size(tmp_path) -> None:
    pytest.importorskip("torchao")
    pytest.importorskip("bitsandbytes")
    cmd = [sys.executable, str(BENCH), "--preset", "flux-dev-24gb", "--device", "cpu", "--dtype", "float32",
           "--layers", "1", "1", "--heads", "1", "--sizes", "32", "--text-tokens", "8", "--warmup", "1", "--iters",
           "1", "--threads", "1", "--refs", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "base int8, optimizer adamw8bit" in done.stdout
    rows = re.findall(r"\| K=1, ckpt on, eager, 32 px \| (\S+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]*) \|", done.stdout)
    assert [r[0] for r in rows] == ["sft", "dpo", "focusdpo", "focusdpo-cosine"]
    assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows)
    assert rows[2][3] and float(rows[2][3]) > 0  # the FocusDPO/DPO ratio
