"""Re-export of :mod:`focusdpo.lora` (the LoRA helpers moved there so ``backbones`` and ``eval`` need not import
``train``); kept so ``focusdpo.train.lora`` imports keep working."""

from focusdpo.lora import (  # noqa: F401
    ADAPTER,
    adapters_disabled,
    adapters_enabled,
    adapters_merged,
    attach_lora,
    check_finite,
    has_lora,
    load_lora,
    load_lora_state_dict,
    lora_parameters,
    lora_state_dict,
    save_lora,
    set_adapters_enabled,
)
