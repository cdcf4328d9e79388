"""Training: the DPO trainer, checkpointing and tiny-base pretraining (LoRA plumbing: :mod:`focusdpo.lora`)."""
