"""Tiny test models with deterministic weights, so the repository tracks configs and reference
outputs but no weight files. src/train/model/mod.rs (`tests::fill_deterministic`) computes the same
values: parameter p (in sorted name order) element k is ((h >> 8) % 2001 - 1000) / 1000 * 0.1 with
h = (k * 2654435761 + p * 40503 + 12345) mod 2^32, plus 1 for norm weights; f32.
"""
import json
import numpy as np
import torch


def deterministic_values(p, numel, norm):
    k = np.arange(numel, dtype=np.uint64)
    h = (k * np.uint64(2654435761) + np.uint64(p * 40503 + 12345)) & np.uint64(0xFFFFFFFF)
    v = ((h >> np.uint64(8)) % np.uint64(2001)).astype(np.float64)
    v = (v - 1000.0) / 1000.0 * 0.1 + (1.0 if norm else 0.0)
    return v.astype(np.float32)


def fill_deterministic(model):
    """Overwrites every parameter of `model` (tied ones once) with the deterministic values."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for p, name in enumerate(sorted(params)):
            t = params[name]
            values = deterministic_values(p, t.numel(), name.endswith("norm.weight"))
            t.copy_(torch.from_numpy(values).view(t.shape))
    return model


def write_tensors_json(path, tensors):
    """Reference tensors as JSON: {name: {"shape": [...], "data": [...]}} (f32 values, i64 ids)."""
    out = {n: {"shape": list(t.shape), "data": t.reshape(-1).tolist()} for n, t in tensors.items()}
    path.write_text(json.dumps(out))
