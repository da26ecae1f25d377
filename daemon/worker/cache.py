"""The worker's warm pipelines: loaded once, reused by later jobs, evicted least recently used first when
a new one would not fit the memory budget or the count limit. No torch import: what frees device memory
after an eviction is the backend's ``release`` callback.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger


@dataclass
class Loaded:
    """One warm pipeline (per model folder, offload mode and weight precision)."""

    model_path: str
    pipes: dict[str, Any]  # "t2v" / "i2v" -> pipeline sharing the same components
    load_seconds: float
    size_mb: float = 0.0  # weights on disk: what it holds in memory, near enough for eviction
    loras: Any = None  # daemon.worker.lora.LoraManager: adapters stay loaded with the pipeline, switched per job
    compiled: bool = False  # its transformer blocks were torch.compiled (in place: every later job runs them)
    attention: str = "native"  # the attention backend its transformers are set to
    model: str = ""  # the model's name (LocatedModel.name), as the daemon knows it
    offload: str = "none"  # the offload mode it was placed with (none | model | group | sequential)
    fp8: bool = False
    device_mb: float = 0.0  # what it keeps on the device between jobs (its weights when resident)


def weights_mb(folder: Path | str) -> float:
    """Size of a diffusers folder's weights (safetensors): the memory its pipeline will hold, near enough."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*.safetensors")) / (1 << 20)


class PipelineCache:
    """Warm pipelines by key, least recently used first, under ``budget_mb`` and ``max_entries``."""

    def __init__(self, *, max_entries: int, budget_mb: float, release: Callable[[], None] = lambda: None) -> None:
        self.max_entries = max_entries
        self.budget_mb = budget_mb
        self.release = release  # frees what an evicted pipeline held (torch.cuda.empty_cache on a GPU)
        self._entries: OrderedDict[str, Loaded] = OrderedDict()

    def get(self, key: str) -> Loaded | None:
        """The entry, now the most recently used; None when it is not warm."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def make_room(self, size_mb: float) -> list[str]:
        """Evict, least recently used first, until a pipeline of ``size_mb`` fits the budget and the count
        limit. Returns the model folders evicted."""
        evicted: list[str] = []
        while self._entries and (len(self._entries) >= self.max_entries or self.held_mb() + size_mb > self.budget_mb):
            old_key, old = self._entries.popitem(last=False)
            logger.info(
                "worker.pipeline_evicted path={} size_mb={:.0f} budget_mb={:.0f}", old_key, old.size_mb, self.budget_mb
            )
            evicted.append(old.model_path)
            del old
            self.release()
        return evicted

    def fit_on_device(self, keep: str | None, need_mb: float, room_mb: float) -> list[str]:
        """Evict, least recently used first, the entries other than ``keep`` until what they keep on the device
        plus ``need_mb`` (a job's estimate) fits ``room_mb`` (the device's free memory plus what this worker
        holds there). Returns the model folders evicted. A job that fits the empty device thus never waits on
        pipelines its own worker keeps warm."""
        evicted: list[str] = []
        while True:
            others = [(k, e) for k, e in self._entries.items() if k != keep and e.device_mb > 0]
            if not others or sum(e.device_mb for _, e in others) + need_mb <= room_mb:
                return evicted
            old_key, old = others[0]
            del self._entries[old_key]
            logger.info(
                "worker.pipeline_evicted path={} device_mb={:.0f} need_mb={:.0f} room_mb={:.0f}",
                old_key,
                old.device_mb,
                need_mb,
                room_mb,
            )
            evicted.append(old.model_path)
            del old
            self.release()

    def device_mb(self) -> float:
        """What the warm pipelines keep on the device between jobs."""
        return sum(e.device_mb for e in self._entries.values())

    def entries(self) -> list[Loaded]:
        """The warm pipelines, least recently used first."""
        return list(self._entries.values())

    def put(self, key: str, entry: Loaded) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)

    def holding(self, pipe: Any) -> Loaded | None:
        """The entry that holds this pipeline (for any task)."""
        return next((e for e in self._entries.values() if any(p is pipe for p in e.pipes.values())), None)

    def held_mb(self) -> float:
        return sum(e.size_mb for e in self._entries.values())

    def clear(self) -> None:
        self._entries.clear()
        self.release()

    def keys(self) -> list[str]:
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries
