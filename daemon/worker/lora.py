"""LoRA adapters on a warm pipeline, in the worker: :class:`LoraManager` (one per loaded pipeline).

The daemon checked and resolved each LoRA at intake (:func:`daemon.jobspec.lora.validate`); here they are
loaded once per transformer (named after the file's sha256), exactly the job's ones are activated with their
strengths on each expert, and LoRA is disabled for jobs without any, so the base weights are never reloaded.
torch / diffusers / safetensors are imported lazily, inside the methods that need them.
"""

from __future__ import annotations

import hashlib
import os
import stat
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from daemon.errors import Category, JobError, classify_exception
from daemon.jobspec.lora import EXPERT_COMPONENTS, ResolvedLora, adapter_name
from daemon.jobspec.lora_files import read_safetensors_keys
from daemon.jobspec.lora_keys import analyse_lora_keys, canonical_diffusers_key, lora_error


class LoraApplied(NamedTuple):
    active: list[str]  # adapter names active for this job (for the sidecar), in job order
    loaded: bool  # whether any adapter was loaded from disk for this job


class LoraManager:
    """Keeps LoRA adapters on one loaded pipeline (one per pipeline cache entry; pipelines made with
    ``from_pipe`` share its transformers and can share its manager too).

    Adapters stay loaded once loaded (named ``l_<sha256[:16]>``, so a file is loaded once per transformer);
    each :meth:`apply` activates exactly the job's ones on each transformer and disables the rest, so the
    base weights are never touched or reloaded. At most ``max_adapters`` adapters stay per transformer; the
    least recently used inactive ones are deleted beyond that.

    Strength 0 is treated as "not active" (not loaded, not computed): the output is then exactly the base
    model's. (``set_adapters`` with weight 0 is bit-exact too with peft's LoRA layers, as tested, but costs the
    extra matmuls.)
    """

    def __init__(self, max_adapters: int = 8) -> None:
        self.max_adapters = max(1, int(max_adapters))
        self._verified: set[str] = set()  # sha256s checked against the file content
        self._lru: OrderedDict[tuple[str, str], None] = OrderedDict()  # (component, adapter name)

    @staticmethod
    def adapters_on(pipe: Any) -> dict[str, list[str]]:
        """Adapter names loaded on each transformer of ``pipe``."""
        out = {}
        for comp in ("transformer", "transformer_2"):
            model = getattr(pipe, comp, None)
            if model is not None:
                out[comp] = list(getattr(model, "peft_config", None) or {})
        return out

    def apply(self, pipe: Any, loras: Sequence[Mapping[str, Any] | ResolvedLora]) -> LoraApplied:
        wanted: dict[str, list[tuple[str, float]]] = {"transformer": [], "transformer_2": []}
        plan: list[tuple[dict[str, Any], str, str]] = []
        for item in loras:
            entry = item.model_dump() if isinstance(item, ResolvedLora) else dict(item)
            strength = float(entry.get("strength", 1.0))
            expert = entry.get("expert", "high")
            if expert not in EXPERT_COMPONENTS:
                raise lora_error(f"unknown LoRA expert {expert!r}")
            for comp in EXPERT_COMPONENTS[expert]:
                if getattr(pipe, comp, None) is None:
                    raise lora_error(
                        f"LoRA {Path(entry['path']).name}: expert {expert!r} needs {comp}, which "
                        "this pipeline does not have (one-transformer model)",
                        "Use expert: high.",
                    )
            if strength == 0:
                continue
            name = adapter_name(entry["sha256"])
            for comp in EXPERT_COMPONENTS[expert]:
                if any(n == name for n, _ in wanted[comp]):
                    raise lora_error(f"LoRA {Path(entry['path']).name} is listed twice for {comp}")
                wanted[comp].append((name, strength))
                plan.append((entry, comp, name))
        loaded = False
        for entry, comp, name in plan:
            model = getattr(pipe, comp)
            if name not in (getattr(model, "peft_config", None) or {}):
                self._load(pipe, comp, name, entry)
                loaded = True
            self._lru.pop((comp, name), None)
            self._lru[(comp, name)] = None
        self._evict(pipe, wanted)
        for comp in ("transformer", "transformer_2"):
            model = getattr(pipe, comp, None)
            if model is None or not getattr(model, "peft_config", None):
                continue
            if wanted[comp]:
                # disable_lora() sticks: set_adapters() alone does not turn the layers back on.
                model.enable_lora()
                model.set_adapters([n for n, _ in wanted[comp]], [w for _, w in wanted[comp]])
            else:
                model.disable_lora()
        active: list[str] = []
        for _, _, name in plan:
            if name not in active:
                active.append(name)
        return LoraApplied(active, loaded)

    def _evict(self, pipe: Any, wanted: dict[str, list[tuple[str, float]]]) -> None:
        for comp in ("transformer", "transformer_2"):
            model = getattr(pipe, comp, None)
            if model is None:  # a one-transformer pipeline: nothing loaded there to evict
                continue
            names = list(getattr(model, "peft_config", None) or {})
            excess = len(names) - self.max_adapters
            if excess <= 0:
                continue
            keep = {n for n, _ in wanted[comp]}
            order = [n for (c, n) in self._lru if c == comp]
            candidates = [n for n in names if n not in order] + order  # unknown ones first, then LRU order
            victims = [n for n in candidates if n in names and n not in keep][:excess]
            if victims:
                model.delete_adapters(victims)
                for n in victims:
                    self._lru.pop((comp, n), None)

    def _load(self, pipe: Any, comp: str, name: str, entry: Mapping[str, Any]) -> None:
        path = Path(entry["path"])
        label = path.name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise lora_error(f"LoRA {label} is gone ({path})") from None
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
            raise lora_error(f"LoRA {label} is no longer a regular file")
        sha = entry["sha256"]
        if sha not in self._verified:
            digest = hashlib.sha256()
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    digest.update(chunk)
            if digest.hexdigest() != sha:
                raise lora_error(
                    f"LoRA {label} changed after the job was accepted (sha256 differs)", "Submit the job again."
                )
            self._verified.add(sha)
        source: Any = str(path)
        keys = read_safetensors_keys(path)
        analysis = analyse_lora_keys(keys)
        if analysis.needs_rename:
            # diffusers would skip un-prefixed keys and misread ".default" adapter segments (it then keeps the
            # freshly initialised LoRA weights): hand it the renamed state dict instead of the path.
            from safetensors.torch import load_file

            raw = load_file(str(path), device="cpu")
            source = {}
            for k, v in raw.items():
                canon = canonical_diffusers_key(k)
                if canon is not None:
                    source[canon] = v
        kwargs: dict[str, Any] = {"adapter_name": name}
        if isinstance(source, str):
            kwargs.update(use_safetensors=True, local_files_only=True)  # never fall back to pickle
        if comp == "transformer_2":
            kwargs["load_into_transformer_2"] = True
        try:
            with warnings.catch_warnings():
                # peft warns on every adapter after the first; several adapters per model is the point here.
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                pipe.load_lora_weights(source, **kwargs)
        except JobError:
            raise
        except Exception as exc:  # noqa: BLE001 - translated at this boundary
            classified = classify_exception(exc)
            if classified.category in (Category.OUT_OF_MEMORY, Category.DISK_FULL):
                raise classified from exc
            raise lora_error(
                f"diffusers could not load LoRA {label} into {comp}: {type(exc).__name__}: {str(exc)[:500]}"
            ) from exc
        model = getattr(pipe, comp)
        if name not in (getattr(model, "peft_config", None) or {}):
            raise lora_error(f"LoRA {label}: diffusers found no weights for the Wan transformer in it")


__all__ = ["LoraManager", "LoraApplied"]
