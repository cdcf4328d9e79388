"""FLUX.2 [klein] text conditioning: stacked hidden states of a Qwen3 language model (``TextEncoder`` protocol).

Exactly what ``Flux2KleinPipeline._get_qwen3_prompt_embeds`` computes, so a LoRA trained here sees the pipeline's
conditioning: each prompt is wrapped in the tokenizer's chat template as one user message (generation prompt on,
thinking off), padded to ``max_tokens``, run through ``Qwen3ForCausalLM`` with its attention mask, and the hidden
states of layers ``(9, 18, 27)`` are concatenated per token: ``[B, max_tokens, 3 * hidden_size]`` (7680 for the
4B model's Qwen3-4B). FLUX.2 has no pooled text vector: ``TextCond.pooled`` is ``[B, 0]``.

Difference from the pipeline, on purpose (as for FLUX.1's T5): a prompt whose templated form is longer than
``max_tokens`` raises, where the pipeline truncates silently.

The model is frozen; ``offload=True`` keeps it on the CPU between calls. :class:`~focusdpo.backbones.flux_text.
TextCache` wraps this encoder unchanged (it needs only ``encode``, ``fingerprint``, ``device`` and the widths).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from focusdpo.backbones.base import TextCond

HIDDEN_LAYERS = (9, 18, 27)  # Flux2KleinPipeline's default text_encoder_out_layers


class Flux2TextEncoder:
    """A Qwen3 causal LM + its tokenizer behind ``encode(prompts) -> TextCond``.

    ``encode``: ``tokens [B, max_tokens, len(layers) * hidden_size]`` in the model's dtype, ``pooled [B, 0]``, on
    the execution device, without gradient.
    """

    def __init__(self, model: nn.Module, tokenizer, max_tokens: int = 512, layers: Sequence[int] = HIDDEN_LAYERS,
                 device: torch.device | str | None = None, offload: bool = False) -> None:
        if max_tokens < 1:
            raise ValueError(f"Flux2TextEncoder: max_tokens={max_tokens} is invalid: allowed >= 1")
        n_layers = int(model.config.num_hidden_layers)
        if not layers or max(layers) > n_layers or min(layers) < 0:
            raise ValueError(f"Flux2TextEncoder: hidden layers {tuple(layers)} do not exist in a {n_layers}-layer "
                             f"text encoder: allowed 0..{n_layers}")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("Flux2TextEncoder: the tokenizer has no chat template; the FLUX.2 pipelines wrap every "
                             "prompt in it: use the tokenizer/ folder that ships with the model")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.layers = tuple(int(i) for i in layers)
        self.offload = offload
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.to(self.device)

    @classmethod
    def from_pretrained(cls, path: str, max_tokens: int = 512, dtype: torch.dtype = torch.float32,
                        device: torch.device | str | None = None, offload: bool = False) -> Flux2TextEncoder:
        """Load ``text_encoder/`` (Qwen3ForCausalLM, safetensors) and ``tokenizer/`` of a FLUX.2 folder or hub id."""
        from transformers import AutoTokenizer, Qwen3ForCausalLM

        model = Qwen3ForCausalLM.from_pretrained(path, subfolder="text_encoder", dtype=dtype, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
        return cls(model, tokenizer, max_tokens=max_tokens, device=device or "cpu", offload=offload)

    @property
    def dim(self) -> int:
        return len(self.layers) * int(self.model.config.hidden_size)

    @property
    def pooled_dim(self) -> int:
        return 0

    def to(self, device: torch.device | str) -> Flux2TextEncoder:
        """Set the execution device (the weights follow unless offloading)."""
        self.device = torch.device(device)
        self.model.to("cpu" if self.offload else self.device)
        return self

    @contextmanager
    def _placed(self) -> Iterator[None]:
        if self.offload:
            self.model.to(self.device)
        try:
            yield
        finally:
            if self.offload:
                self.model.to("cpu")

    def token_ids(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, attention_mask)``, both ``long [B, max_tokens]``: each prompt as the pipeline templates it."""
        ids, masks = [], []
        for prompt in prompts:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True, enable_thinking=False)
            n = len(self.tokenizer(text).input_ids)
            if n > self.max_tokens:
                raise ValueError(f"prompt {prompt!r} has {n} tokens with the chat template, more than "
                                 f"model.max_text_tokens={self.max_tokens}: shorten it or raise model.max_text_tokens "
                                 f"(FLUX.2 pipelines: 512)")
            enc = self.tokenizer(text, return_tensors="pt", padding="max_length", truncation=True,
                                 max_length=self.max_tokens)
            ids.append(enc["input_ids"])
            masks.append(enc["attention_mask"])
        return torch.cat(ids), torch.cat(masks)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> TextCond:
        if isinstance(prompts, str) or len(prompts) == 0:
            raise ValueError(f"Flux2TextEncoder.encode: prompts={prompts!r}: expected a non-empty list of strings")
        ids, mask = self.token_ids(prompts)
        with self._placed():
            out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                             output_hidden_states=True, use_cache=False)
        hidden = torch.stack([out.hidden_states[k] for k in self.layers], dim=1)  # [B, layers, L, H]
        b, n_layers, length, width = hidden.shape
        tokens = hidden.permute(0, 2, 1, 3).reshape(b, length, n_layers * width).to(self.device)
        return TextCond(tokens, tokens.new_zeros(b, 0))

    def fingerprint(self) -> str:
        """A short hash of the model (config, dtype, a sample of every weight), the tokenizer's vocabulary and
        chat template, the layers and ``max_tokens``: features cached under it match this encoder only."""
        h = hashlib.blake2b(digest_size=8)
        h.update(f"{self.max_tokens} {self.layers} {self.model.dtype}".encode())
        h.update(self.model.config.to_json_string(use_diff=False).encode())
        h.update(json.dumps(sorted(self.tokenizer.get_vocab().items())).encode())
        h.update(str(self.tokenizer.chat_template).encode())
        for name, p in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().flatten()[:1024].float().cpu().numpy().tobytes())
        return h.hexdigest()
