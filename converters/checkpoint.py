"""Read PyTorch / safetensors weight files safely into MLX arrays.

- `.pt` / `.pth` / `.bin`: `torch.load(weights_only=True, map_location="cpu")` only. A checkpoint that needs
  arbitrary pickle (custom classes, argparse.Namespace, ...) is refused, never unpickled.
- `.safetensors`: the header is checked against the file size before MLX reads it (a truncated file is an
  error, never a crash).
- A directory: its `*.safetensors` files, else its `pytorch_model*.bin` / `*.pt` files (sharded HF dirs).

Every failure is one KVPredError line naming the file.
"""

from __future__ import annotations

import json
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_kvpred.errors import KVPredError

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")  # training checkpoints nest the weights
STRIP_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers


def read_state_dict(path: str | Path) -> dict[str, mx.array]:
    """All tensors of a weights file or model dir, by name, as MLX arrays (dtype kept; bf16 stays bf16)."""
    path = Path(path)
    if not path.exists():
        raise KVPredError(f"weights not found: {path}")
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted(
            f for f in path.iterdir() if f.suffix in TORCH_SUFFIXES and f.is_file())
        if not files:
            raise KVPredError(f"{path}: no .safetensors, .bin or .pt weight files in this directory")
        weights: dict[str, mx.array] = {}
        for f in files:
            weights.update(read_state_dict(f))
        return weights
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in TORCH_SUFFIXES:
        return _read_torch(path)
    raise KVPredError(f"{path}: unknown weights format {path.suffix!r} (.pt, .pth, .bin, .ckpt or .safetensors)")


def _read_safetensors(path: Path) -> dict[str, mx.array]:
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError(f"header of {n} bytes does not fit in the {size}-byte file")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise ValueError(f"tensor data ends at byte {8 + n + end}, the file has {size}")
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise KVPredError(f"{path}: truncated or corrupt safetensors file ({e})") from e
    try:
        return dict(mx.load(str(path)))
    except Exception as e:
        raise KVPredError(f"{path}: cannot read safetensors file ({_first_line(e)})") from e


def _import_torch():
    try:
        import torch
    except ImportError:
        raise KVPredError("reading PyTorch checkpoints (.pt/.bin) needs PyTorch: pip install 'kvpred-mlx[torch]' "
                          "(or convert the file to .safetensors)") from None
    return torch


def _read_torch(path: Path) -> dict[str, mx.array]:
    torch = _import_torch()
    import pickle

    try:
        obj = torch.load(str(path), weights_only=True, map_location="cpu", mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        msg = str(e)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", msg)
        if found or ("Weights only load failed" in msg and "Unsupported" in msg):
            what = found.group(1) if found else "a non-tensor object"
            raise KVPredError(f"{path}: refused: this checkpoint needs arbitrary pickle ({what}); only plain tensor "
                              "state dicts are read (torch.load weights_only=True). Re-save it with "
                              "torch.save(model.state_dict(), ...)") from None
        raise KVPredError(f"{path}: truncated or corrupt checkpoint ({_first_line(e)})") from None
    except Exception as e:  # zip/EOF/KeyError... from a damaged file
        raise KVPredError(f"{path}: truncated or corrupt checkpoint ({_first_line(e)})") from None
    state = _unwrap(obj, torch)
    if not state:
        raise KVPredError(f"{path}: no tensors in this checkpoint (expected a state dict)")
    return {k: _to_mx(v, torch) for k, v in state.items()}


def _unwrap(obj: Any, torch) -> dict[str, Any]:
    """The tensor dict of a checkpoint: the object itself, or a nested state dict of a training checkpoint."""
    if not isinstance(obj, dict):
        return {}
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                return _unwrap(obj[key], torch)
        return {}
    for prefix in STRIP_PREFIXES:
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def _to_mx(t, torch) -> mx.array:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bf16: move the bits
        return mx.array(t.view(torch.int16).numpy()).view(mx.bfloat16)
    if t.dtype == torch.bool:
        return mx.array(t.numpy())
    return mx.array(np.ascontiguousarray(t.numpy()))


def _first_line(e: BaseException) -> str:
    """The gist of an exception message: its first line, first sentence if long."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    line = text.splitlines()[0]
    if len(line) > 120 and ". " in line:
        line = line.split(". ", 1)[0]
    return line[:200]
