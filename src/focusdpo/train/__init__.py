"""Training: the DPO trainer, checkpointing, LoRA plumbing (:mod:`focusdpo.train.lora`) and tiny-base pretraining."""
