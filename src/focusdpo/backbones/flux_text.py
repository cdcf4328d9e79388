"""FLUX text conditioning: T5 per-token features + CLIP pooled vector (the ``TextEncoder`` protocol).

Exactly what ``FluxPipeline.encode_prompt`` computes, so a LoRA trained here sees the same conditioning in the
pipeline: T5 ``last_hidden_state`` of the prompt padded to ``max_tokens`` (no attention mask, as in the
pipeline) and the CLIP text model's ``pooler_output`` of the prompt padded to the CLIP tokenizer's length (77).

Differences from the pipeline, on purpose: a prompt longer than ``max_tokens`` T5 tokens raises (the pipeline
truncates with a warning; training on a silently cut prompt teaches the wrong thing); CLIP, whose only job
here is one pooled vector, truncates at its 77 tokens as in the pipeline.

Both encoders are frozen. With ``offload=True`` they stay on the CPU and visit the execution device only
during ``encode``. :class:`TextCache` keeps each prompt's features on disk (``model.<backbone>.latent_cache``), so that
the encoders run once per distinct prompt rather than once per step.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from focusdpo.backbones.base import TextCond


class FluxTextEncoder:
    """T5 encoder + CLIP text model behind one ``encode(prompts) -> TextCond``.

    ``encode``: ``tokens [B, max_tokens, t5.d_model]`` (4096 for T5-XXL), ``pooled [B, clip.hidden_size]``
    (768 for CLIP-L), in the encoders' dtype, on the execution device, without gradient.
    """

    def __init__(self, t5: nn.Module, t5_tokenizer, clip: nn.Module, clip_tokenizer, max_tokens: int = 512,
                 device: torch.device | str | None = None, offload: bool = False) -> None:
        if max_tokens < 1:
            raise ValueError(f"FluxTextEncoder: max_tokens={max_tokens} is invalid: allowed >= 1")
        self.t5 = t5.eval().requires_grad_(False)
        self.clip = clip.eval().requires_grad_(False)
        self.t5_tokenizer = t5_tokenizer
        self.clip_tokenizer = clip_tokenizer
        self.max_tokens = max_tokens
        self.clip_tokens = int(min(clip_tokenizer.model_max_length, clip.config.max_position_embeddings))
        self.offload = offload
        self.device = torch.device(device) if device is not None else next(t5.parameters()).device
        self.to(self.device)

    @classmethod
    def from_pretrained(cls, path: str, max_tokens: int = 512, dtype: torch.dtype = torch.float32,
                        device: torch.device | str | None = None, offload: bool = False) -> FluxTextEncoder:
        """Load from a diffusers FLUX folder or hub id: ``text_encoder`` + ``tokenizer`` (CLIP),
        ``text_encoder_2`` + ``tokenizer_2`` (T5). Safetensors weights only, no remote code."""
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        clip = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=dtype, use_safetensors=True)
        t5 = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2", torch_dtype=dtype, use_safetensors=True)
        clip_tok = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
        t5_tok = AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2")
        return cls(t5, t5_tok, clip, clip_tok, max_tokens=max_tokens, device=device or "cpu", offload=offload)

    @property
    def dim(self) -> int:
        return int(self.t5.config.d_model)

    @property
    def pooled_dim(self) -> int:
        return int(self.clip.config.hidden_size)

    def to(self, device: torch.device | str) -> FluxTextEncoder:
        """Set the execution device (the weights follow unless offloading)."""
        self.device = torch.device(device)
        target = "cpu" if self.offload else self.device
        self.t5.to(target)
        self.clip.to(target)
        return self

    @contextmanager
    def _placed(self, module: nn.Module) -> Iterator[None]:
        if self.offload:
            module.to(self.device)
        try:
            yield
        finally:
            if self.offload:
                module.to("cpu")

    def t5_ids(self, prompts: Sequence[str]) -> torch.Tensor:
        """``long [B, max_tokens]`` T5 ids (EOS included, padded); a prompt that does not fit raises."""
        lengths = [len(ids) for ids in self.t5_tokenizer(list(prompts)).input_ids]
        long = [(p, n) for p, n in zip(prompts, lengths, strict=True) if n > self.max_tokens]
        if long:
            p, n = long[0]
            raise ValueError(f"prompt {p!r} has {n} T5 tokens, more than model.max_text_tokens={self.max_tokens} "
                             f"({len(long)} such prompt(s) in the batch): shorten it or raise model.max_text_tokens "
                             f"(FLUX.1-dev: up to 512)")
        return self.t5_tokenizer(list(prompts), padding="max_length", max_length=self.max_tokens,
                                 return_tensors="pt").input_ids

    def clip_ids(self, prompts: Sequence[str]) -> torch.Tensor:
        """``long [B, 77]`` CLIP ids, truncated at CLIP's length as in ``FluxPipeline``."""
        return self.clip_tokenizer(list(prompts), padding="max_length", max_length=self.clip_tokens,
                                   truncation=True, return_tensors="pt").input_ids

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> TextCond:
        if isinstance(prompts, str) or len(prompts) == 0:
            raise ValueError(f"FluxTextEncoder.encode: prompts={prompts!r}: expected a non-empty list of strings")
        t5_ids, clip_ids = self.t5_ids(prompts), self.clip_ids(prompts)
        with self._placed(self.t5):
            tokens = self.t5(t5_ids.to(self.device), output_hidden_states=False)[0]
        with self._placed(self.clip):
            pooled = self.clip(clip_ids.to(self.device), output_hidden_states=False).pooler_output
        return TextCond(tokens.to(self.device), pooled.to(self.device))

    def fingerprint(self) -> str:
        """A short hash of both encoders (config, dtype, a sample of every weight tensor), the tokenizers'
        vocabularies and ``max_tokens``: text features cached under it match this encoder only."""
        h = hashlib.blake2b(digest_size=8)
        h.update(str(self.max_tokens).encode())
        for model, tok in ((self.t5, self.t5_tokenizer), (self.clip, self.clip_tokenizer)):
            h.update(model.config.to_json_string(use_diff=False).encode())
            h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
            for name, p in sorted(model.state_dict().items()):
                h.update(name.encode())
                h.update(p.detach().flatten()[:1024].float().cpu().numpy().tobytes())
        return h.hexdigest()


class TextCache:
    """A ``TextEncoder`` wrapper that caches each prompt's features on disk, addressed by the prompt text.

    ``<root>/text-<encoder fingerprint>/<hash of the prompt>.safetensors`` holds ``tokens [L, D]`` and
    ``pooled [P]`` as the encoder returned them. Prompts repeat across a DIP set's records and epochs, so after
    the first pass (or ``focusdpo cache-latents``) T5-XXL and CLIP are never run, and never moved when offloaded.
    ``hits`` and ``misses`` count prompts.
    """

    def __init__(self, encoder: FluxTextEncoder, root: str | Path) -> None:
        self.encoder = encoder
        self.dir = Path(root).expanduser() / f"text-{encoder.fingerprint()}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    @property
    def dim(self) -> int:
        return self.encoder.dim

    @property
    def pooled_dim(self) -> int:
        return self.encoder.pooled_dim

    def to(self, device: torch.device | str) -> TextCache:
        self.encoder.to(device)
        return self

    def _path(self, prompt: str) -> Path:
        return self.dir / f"{hashlib.blake2b(prompt.encode(), digest_size=16).hexdigest()}.safetensors"

    def encode(self, prompts: Sequence[str]) -> TextCond:
        if isinstance(prompts, str) or len(prompts) == 0:
            raise ValueError(f"TextCache.encode: prompts={prompts!r}: expected a non-empty list of strings")
        found = {p: load_file(self._path(p)) for p in dict.fromkeys(prompts) if self._path(p).exists()}
        missing = [p for p in dict.fromkeys(prompts) if p not in found]
        self.hits += sum(p in found for p in prompts)
        self.misses += len(prompts) - sum(p in found for p in prompts)
        if missing:
            fresh = self.encoder.encode(missing)
            for i, p in enumerate(missing):
                found[p] = {"tokens": fresh.tokens[i].detach().cpu().contiguous(),
                            "pooled": fresh.pooled[i].detach().cpu().contiguous()}
                tmp = self._path(p).with_suffix(f".{os.getpid()}.tmp")
                save_file(found[p], tmp)
                tmp.replace(self._path(p))  # atomic: a killed run leaves no torn file
        device = self.encoder.device
        return TextCond(torch.stack([found[p]["tokens"] for p in prompts]).to(device),
                        torch.stack([found[p]["pooled"] for p in prompts]).to(device))
