"""The shipped accelerate configs parse with accelerate's own loader and name the intended strategy."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

ROOT = Path(__file__).resolve().parents[2] / "configs" / "accelerate"


@pytest.mark.parametrize("name, kind, machines", [
    ("ddp.yaml", "MULTI_GPU", 1),
    ("ddp-multinode.yaml", "MULTI_GPU", 2),
    ("fsdp.yaml", "FSDP", 1),
    ("deepspeed-zero2.yaml", "DEEPSPEED", 1),
])
def test_config_loads(name: str, kind: str, machines: int) -> None:
    cfg = load_config_from_file(str(ROOT / name))
    assert str(cfg.distributed_type).endswith(kind)
    assert cfg.num_machines == machines and cfg.mixed_precision == "bf16"
    if kind == "FSDP":
        assert cfg.fsdp_config["fsdp_version"] == 2  # FSDP2: per-parameter sharding, frozen base and LoRA side by side
    if kind == "DEEPSPEED":
        assert cfg.deepspeed_config["zero_stage"] == 2
        assert cfg.deepspeed_config["gradient_accumulation_steps"] == 1
