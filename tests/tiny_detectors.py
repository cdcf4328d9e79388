"""Tiny random zero-shot detectors saved with ``save_pretrained``: the real loading code runs, no download."""

from __future__ import annotations

import string
from pathlib import Path


def write_tiny_owlv2(folder: Path) -> Path:
    """A 1-layer OWLv2 (64 px input, 16 px patches) and its processor (a character-level CLIP tokenizer) in
    ``folder``; its box head predicts each patch's own grid cell (non-empty boxes). Returns ``folder``."""
    import torch
    from transformers import CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    vocab = {"<|endoftext|>": 0, "<|startoftext|>": 1}  # OWL reads a query whose first id is 0 as padding
    for c in string.ascii_lowercase + string.digits + string.punctuation:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    torch.manual_seed(0)
    owl = Owlv2ForObjectDetection(Owlv2Config(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=1, eos_token_id=0,
                         pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=64, patch_size=16), projection_dim=32))
    with torch.no_grad():  # random weights saturate the box sigmoid (zero-size boxes); zeroed, each patch predicts
        owl.box_head.dense2.weight.zero_()  # its own grid cell, the box prior OWLv2 builds in
    owl.save_pretrained(folder)
    Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 64, "width": 64}), tokenizer=tok
                   ).save_pretrained(folder)
    return folder
