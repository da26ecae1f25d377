"""What the host's GPUs are, without importing torch (the daemon's main process stays light)."""

from __future__ import annotations


def nvml_gpu_count() -> int:
    """Number of NVIDIA GPUs NVML reports; 0 where there is no driver (CPU-only hosts, CI)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound, DriverNotLoaded, ImportError: no usable GPU
        return 0
    try:
        return int(pynvml.nvmlDeviceGetCount())
    finally:
        pynvml.nvmlShutdown()
