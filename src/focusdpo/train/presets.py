"""``train.memory``: one preset for the memory/speed trade-off of a run (issue 17 point 2).

| preset | gradient checkpointing | text encoders + VAE | latent / text cache |
|---|---|---|---|
| ``fast`` (default) | the field | the field (``offload_encoders``) | the field (``latent_cache``) |
| ``balanced`` | on | on the device | on |
| ``low`` | on | offloaded to the CPU between calls | on |

Precedence: a preset only turns savings on. ``train.gradient_checkpointing: true`` and
``model.<backbone>.offload_encoders: true`` hold under every preset (the effective value is the field OR the
preset), and an explicit ``model.<backbone>.latent_cache`` folder is always the one used; where the preset asks for
the cache and the field is null, the cache is ``<data.path>/latents`` (fill it with ``focusdpo cache-latents``
first: with offloaded encoders a cache miss moves them to the device for that call). ``fast`` adds nothing, so the
fields alone decide. Offloading and caching concern the backbones whose section has those fields (``flux``,
``flux2``: a VAE and text encoders); ``flux-tiny`` has neither and takes the checkpointing part only.

The saved ``config.yaml`` keeps the fields as given; :func:`effective_config` is applied where the run is built,
so ``--resume`` compares the same config.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from focusdpo.config import Config

MEMORY_PRESETS: dict[str, dict[str, bool]] = {
    "fast": {"gradient_checkpointing": False, "offload_encoders": False, "latent_cache": False},
    "balanced": {"gradient_checkpointing": True, "offload_encoders": False, "latent_cache": True},
    "low": {"gradient_checkpointing": True, "offload_encoders": True, "latent_cache": True},
}


def effective_config(cfg: Config) -> Config:
    """``cfg`` with ``train.memory`` applied (see the module doc); ``cfg`` itself is not changed."""
    preset = MEMORY_PRESETS[cfg.train.memory]
    train = dataclasses.replace(cfg.train, gradient_checkpointing=cfg.train.gradient_checkpointing
                                or preset["gradient_checkpointing"])
    model, opts = cfg.model, cfg.model.options
    if hasattr(opts, "offload_encoders") and hasattr(opts, "latent_cache"):  # a backbone with a VAE and encoders
        cache = opts.latent_cache
        if cache is None and preset["latent_cache"] and cfg.data.path:
            cache = str(Path(cfg.data.path) / "latents")
        opts = dataclasses.replace(opts, offload_encoders=opts.offload_encoders or preset["offload_encoders"],
                                   latent_cache=cache)
        model = dataclasses.replace(model, options=opts)
    return dataclasses.replace(cfg, train=train, model=model)


def describe_presets(cfg: Config) -> str:
    """YAML comment lines: each preset's settings, and the effective values of ``cfg`` (``focusdpo config``)."""
    lines = ["# train.memory presets (a preset only turns savings on; explicit true fields always hold):"]
    for name, p in MEMORY_PRESETS.items():
        lines.append(f"#   {name}: gradient_checkpointing={'on' if p['gradient_checkpointing'] else 'field'}, "
                     f"offload_encoders={'on' if p['offload_encoders'] else 'field'}, "
                     f"latent_cache={'<data.path>/latents unless set' if p['latent_cache'] else 'field'}")
    eff = effective_config(cfg)
    opts = eff.model.options
    lines.append(f"# effective now (train.memory={cfg.train.memory}): gradient_checkpointing="
                 f"{eff.train.gradient_checkpointing}, offload_encoders={getattr(opts, 'offload_encoders', None)}, "
                 f"latent_cache={getattr(opts, 'latent_cache', None)}")
    return "\n".join(lines) + "\n"
