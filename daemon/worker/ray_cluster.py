"""Which Ray workers a daemon runs (``worker.executor: ray``): join the cluster, then one
daemon.worker.ray_executor.RayExecutor per GPU of it. daemon.runtime.placement.make_workers calls
:func:`ray_workers` only for that setting: with local workers, ray is never imported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loguru import logger

from daemon.config import RayConfig, Settings
from daemon.worker.protocol import ExecutorProtocol, WorkerConfig
from daemon.worker.ray_executor import RayExecutor


def _ray() -> Any:
    import ray

    return ray


def connect(config: RayConfig) -> None:
    """Join the configured cluster (or start a private instance) unless this process is connected already.
    Ray reads its auth token from the environment itself (RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH)."""
    ray = _ray()
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"namespace": config.namespace}
    if config.address is not None:
        kwargs["address"] = config.address
    else:
        kwargs["include_dashboard"] = False
        if config.object_store_memory_mb is not None:
            kwargs["object_store_memory"] = config.object_store_memory_mb * 2**20
    ray.init(**kwargs)
    logger.info("ray.connected address={} resources={}", config.address or "private", ray.cluster_resources())


def ray_workers(settings: Settings, *, clock: Callable[[], float], backend: str | None) -> dict[str, ExecutorProtocol]:
    """One actor per GPU of the cluster (``ray.actors`` to say otherwise); CPU actors where there is no GPU
    and ``worker.device`` allows it."""
    w, rc = settings.worker, settings.ray
    connect(rc)
    gpus = int(_ray().cluster_resources().get("GPU", 0))
    num_gpus = 0 if w.device == "cpu" or (w.device == "auto" and gpus == 0) else 1
    count = rc.actors or max(1, gpus if num_gpus else 1)
    workers: dict[str, ExecutorProtocol] = {}
    for n in range(count):
        config = WorkerConfig(
            worker_name=f"ray{n}",
            device=w.device,
            models_dir=str(settings.paths.models),  # the same path on every node
            allow_cpu_for_real_models=w.allow_cpu_for_real_models,
            max_cached_pipelines=w.max_cached_pipelines,
            cache_budget_mb=w.cache_budget_mb,
            cpu_threads=w.cpu_threads,
            overlap_encoding=w.overlap_encoding,
            log_level=settings.logging.level,
            log_format=settings.logging.format,
            backend=backend,
        )
        workers[config.worker_name] = RayExecutor(
            config,
            ray_config=rc,
            clock=clock,
            stall_timeout_seconds=w.stall_timeout_seconds,
            num_gpus=num_gpus,
            index=n,
            owner=settings.owner,
        )
    return workers
