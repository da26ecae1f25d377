"""Reading safetensors headers without torch: LoRA files (confined, O_NOFOLLOW, hashed once) and the
transformer weights of a model folder (to check that a LoRA fits it). Every refusal of a LoRA file is a
``JobError(invalid_lora)``; an unreadable model folder is a ``JobError(model_not_found)``."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from daemon.errors import Category, JobError
from daemon.fsutil import open_confined
from daemon.jobspec.lora_keys import lora_error

#: A safetensors header longer than this is refused (the format itself allows 100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024
#: Largest LoRA file accepted. Rank-64 A14B distill LoRAs are ~600 MB; full-rank "diff" files are bigger.
MAX_LORA_BYTES = 16 * 1024**3


def _not_safetensors(label: str, why: str) -> JobError:
    return lora_error(f"{label}: not a safetensors file ({why})")


def _parse_header(fh: Any, size: int, label: str) -> tuple[dict[str, Any], bytes]:
    """Read and check the header from ``fh`` at offset 0. Returns (header, the raw bytes read)."""
    head = fh.read(8)
    if len(head) < 8:
        raise _not_safetensors(label, "shorter than 8 bytes")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES:
        raise _not_safetensors(label, f"header length {n} is more than {MAX_HEADER_BYTES} bytes")
    if n < 2 or 8 + n > size:
        raise _not_safetensors(label, f"header length {n} does not fit a {size}-byte file")
    raw = fh.read(n)
    if len(raw) != n:
        raise _not_safetensors(label, "truncated header")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _not_safetensors(label, "the header is not JSON") from None
    if not isinstance(header, dict):
        raise _not_safetensors(label, "the header is not a JSON object")
    data_len = size - 8 - n
    for key, entry in header.items():
        if key == "__metadata__":
            if not isinstance(entry, dict):
                raise _not_safetensors(label, "__metadata__ is not an object")
            continue
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("dtype"), str)
            and isinstance(entry.get("shape"), list)
            and all(isinstance(d, int) for d in entry["shape"])
            and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2
            and all(isinstance(o, int) for o in entry["data_offsets"])
        ):
            raise _not_safetensors(label, f"bad tensor entry {key[:80]!r}")
        start, end = entry["data_offsets"]
        if not 0 <= start <= end <= data_len:
            raise lora_error(
                f"{label}: safetensors file is truncated or corrupt (tensor {key[:80]!r} lies outside the file)"
            )
    return header, head + raw


def read_safetensors_header(
    path: Path | str, roots: Sequence[Path | str] | None = None, *, max_bytes: int = MAX_LORA_BYTES
) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor name → dtype/shape/offsets, plus ``__metadata__``).

    Opened with :func:`daemon.fsutil.open_confined` (O_NOFOLLOW, regular file, at most ``max_bytes``)
    inside ``roots`` (default: the file's own folder, which checks only the file itself).
    """
    path = Path(path)
    roots = list(roots) if roots is not None else [path.parent]
    try:
        with open_confined(path, roots, max_bytes=max_bytes) as fh:
            size = os.fstat(fh.fileno()).st_size
            header, _ = _parse_header(fh, size, path.name)
    except ValueError as exc:
        raise lora_error(f"LoRA {path.name}: {exc}") from None
    return header


def read_safetensors_keys(
    path: Path | str, roots: Sequence[Path | str] | None = None, *, max_bytes: int = MAX_LORA_BYTES
) -> list[str]:
    """The tensor names of a safetensors file, read from its header without torch (see
    :func:`read_safetensors_header`). Raises JobError(invalid_lora, "... not a safetensors file ...")."""
    return [k for k in read_safetensors_header(path, roots, max_bytes=max_bytes) if k != "__metadata__"]


# (st_dev, st_ino, st_size, st_mtime_ns) -> (sha256, header): a LoRA reused by many jobs is hashed once.
_INSPECT_CACHE: OrderedDict[tuple[int, int, int, int], tuple[str, dict[str, Any]]] = OrderedDict()
_INSPECT_CACHE_SIZE = 256


def inspect_lora(path: Path, max_bytes: int) -> tuple[str, dict[str, Any]]:
    """(sha256, safetensors header) of a LoRA file that resolve_lora_path found. Opened once (O_NOFOLLOW): the
    header is parsed and the whole file hashed from the same descriptor; cached by inode, size and mtime."""
    try:
        with open_confined(path, [path.parent], max_bytes=max_bytes) as fh:
            st = os.fstat(fh.fileno())
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            cached = _INSPECT_CACHE.get(key)
            if cached is not None:
                _INSPECT_CACHE.move_to_end(key)
                return cached
            header, raw = _parse_header(fh, st.st_size, path.name)
            h = hashlib.sha256(raw)
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    except ValueError as exc:
        raise lora_error(f"LoRA {path.name}: {exc}") from None
    result = (h.hexdigest(), header)
    _INSPECT_CACHE[key] = result
    while len(_INSPECT_CACHE) > _INSPECT_CACHE_SIZE:
        _INSPECT_CACHE.popitem(last=False)
    return result


def _read_model_header(path: Path) -> dict[str, Any]:
    # Model folders are trusted (found by daemon.models); HF cache snapshots are symlinks, so follow them.
    with open(path, "rb") as fh:
        header, _ = _parse_header(fh, os.fstat(fh.fileno()).st_size, str(path))
    return header


_MODEL_CACHE: dict[tuple[str, int], dict[str, list[int] | None]] = {}


def transformer_header(model_folder: Path | str, subfolder: str = "transformer") -> dict[str, list[int] | None]:
    """Weight name → shape of a diffusers model folder's transformer, from its safetensors header(s).

    Reads ``<subfolder>/diffusion_pytorch_model.safetensors``, or the sharded
    ``diffusion_pytorch_model.safetensors.index.json`` and its shards' headers (headers only: a few hundred
    KB even for A14B). No torch. Raises JobError(model_not_found) when neither exists.
    """
    folder = Path(model_folder) / subfolder
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    single = folder / "diffusion_pytorch_model.safetensors"
    source = index if index.is_file() else single if single.is_file() else None
    if source is None:
        raise JobError(
            Category.MODEL_NOT_FOUND,
            f"{folder} holds no diffusion_pytorch_model.safetensors (or its "
            "sharded index), so LoRAs cannot be checked against it",
        )
    cache_key = (str(source.resolve()), source.stat().st_mtime_ns)
    cached = _MODEL_CACHE.get(cache_key)
    if cached is not None:
        return cached
    shapes: dict[str, list[int] | None] = {}
    try:
        if source is index:
            if index.stat().st_size > MAX_HEADER_BYTES:
                raise ValueError("index file too large")
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError("no weight_map")
            for shard in sorted(set(weight_map.values())):
                shard_path = folder / str(shard)
                if Path(str(shard)).is_absolute() or ".." in Path(str(shard)).parts:
                    raise ValueError(f"odd shard name {shard!r}")
                if shard_path.is_file():
                    for k, v in _read_model_header(shard_path).items():
                        if k != "__metadata__":
                            shapes[k] = v["shape"]
            for k in weight_map:
                shapes.setdefault(k, None)
        else:
            for k, v in _read_model_header(single).items():
                if k != "__metadata__":
                    shapes[k] = v["shape"]
    except JobError as exc:
        raise JobError(
            Category.MODEL_NOT_FOUND, f"transformer weights of {model_folder} are unreadable: {exc.message}"
        ) from None
    except (OSError, ValueError) as exc:
        raise JobError(
            Category.MODEL_NOT_FOUND, f"transformer weights of {model_folder} are unreadable: {exc}"
        ) from None
    if len(_MODEL_CACHE) > 32:
        _MODEL_CACHE.clear()
    _MODEL_CACHE[cache_key] = shapes
    return shapes


def transformer_keys(model_folder: Path | str, subfolder: str = "transformer") -> list[str]:
    """Weight names (``blocks.0.attn1.to_q.weight``, ...) of a model folder's transformer; no torch."""
    return list(transformer_header(model_folder, subfolder))
