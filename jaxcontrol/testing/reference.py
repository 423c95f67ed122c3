"""Build random PyTorch reference models and move tensors across the NCHW/NHWC boundary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Perturb every parameter initialised to a constant (norm scales/biases, zero convs, zero biases).

    Without this, a swapped scale/bias or a missing zero convolution could not make a parity test fail.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            flat = p.reshape(-1)
            if flat.numel() and bool((flat == flat[0]).all()):
                p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def nchw_to_nhwc(x) -> np.ndarray:
    """A (B, C, H, W) torch tensor or array as a contiguous (B, H, W, C) numpy array (dtype kept)."""
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def nhwc_to_nchw(x) -> np.ndarray:
    """A (B, H, W, C) array as a contiguous (B, C, H, W) float32 numpy array."""
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32).transpose(0, 3, 1, 2))


def rel_err(ours_nhwc, ref_nchw) -> tuple[float, float, float]:
    """(max |ours - ref|, max |ref|, their ratio) with `ours` NHWC and `ref` NCHW (compared in float32).
    Raises `AssertionError` when the shapes differ."""
    ours = nhwc_to_nchw(ours_nhwc)
    ref = ref_nchw.detach().cpu().numpy() if isinstance(ref_nchw, torch.Tensor) else np.asarray(ref_nchw)
    if ours.shape != ref.shape:
        raise AssertionError(f"shape mismatch: ours {ours.shape} (as NCHW) vs reference {ref.shape}")
    err = float(np.max(np.abs(ours - ref)))
    mag = float(np.max(np.abs(ref)))
    return err, mag, err / max(mag, 1e-30)


TOKENIZER_WORDS = ["a", "red", "blue", "circle", "square", "with", "light", "background", "green"]


def tiny_clip_tokenizer(folder: str | Path, pad_token: str = "<|endoftext|>") -> Path:
    """A CLIP BPE tokenizer folder over characters and whole words, in the on-disk layout of SD's
    `tokenizer/` (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json)."""
    chars = sorted({c for w in TOKENIZER_WORDS for c in w})
    vocab_tokens = ["!"] + chars + [c + "</w>" for c in chars]
    merges = []
    for w in TOKENIZER_WORDS:  # merge left to right into the whole word
        cur = w[0]
        for j, c in enumerate(w[1:], start=1):
            nxt = c + "</w>" if j == len(w) - 1 else c
            merges.append(f"{cur} {nxt}")
            cur = cur + nxt
            vocab_tokens.append(cur)
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(vocab_tokens))}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special})
    )
    return folder
