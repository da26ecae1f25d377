"""The speed plan's diffusers side, in the worker: whether an attention backend can run here, and the
config object of a planned step cache. The plan itself (what a run applies, and why not) is the daemon's
pure daemon.speed.plan_speed.
"""

from __future__ import annotations

from typing import Any

from daemon.speed import ATTENTION_BACKENDS


def cache_config(cache: dict[str, Any], steps: int):
    """The diffusers config object for a planned cache."""
    from diffusers import FirstBlockCacheConfig, MagCacheConfig

    if cache["type"] == "first_block":
        return FirstBlockCacheConfig(threshold=cache["threshold"])
    return MagCacheConfig(threshold=cache["threshold"], num_inference_steps=steps, mag_ratios=list(cache["mag_ratios"]))


def attention_available(name: str) -> str | None:
    """None when diffusers can use the backend here, else why not.

    Through diffusers' public ``attention_backend`` context manager, which checks the backend's requirements
    (package, version) on entry; entered and left at once, it changes nothing. (None of our backends is a
    Hub-kernel one, the only kind it would download on entry.)"""
    from diffusers import attention_backend

    try:
        with attention_backend(ATTENTION_BACKENDS[name]):
            pass
    except (RuntimeError, ValueError, ImportError) as exc:
        return str(exc)
    return None
