"""Build random PyTorch reference models and move tensors across the NCHW/NHWC boundary."""

from __future__ import annotations

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
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def nhwc_to_nchw(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32).transpose(0, 3, 1, 2))


def rel_err(ours_nhwc, ref_nchw) -> tuple[float, float, float]:
    """(max |ours - ref|, max |ref|, their ratio) with `ours` NHWC and `ref` NCHW."""
    ours = nhwc_to_nchw(ours_nhwc)
    ref = ref_nchw.detach().cpu().numpy() if isinstance(ref_nchw, torch.Tensor) else np.asarray(ref_nchw)
    if ours.shape != ref.shape:
        raise AssertionError(f"shape mismatch: ours {ours.shape} (as NCHW) vs reference {ref.shape}")
    err = float(np.max(np.abs(ours - ref)))
    mag = float(np.max(np.abs(ref)))
    return err, mag, err / max(mag, 1e-30)
