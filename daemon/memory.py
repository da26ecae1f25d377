"""How much GPU memory a job needs, per offload mode, and the fastest mode that fits a GPU. Pure: no torch.

The model
---------
A diffusers Wan pipeline runs in phases, one after the other: text encoding (UMT5-XXL), denoising (the
transformer; two experts for the A14B models, one at a time), VAE decoding (I2V A14B also VAE-*encodes*
its conditioning video first, which costs about what decoding does). The peak is the largest phase::

    phase peak  = weights on the GPU during that phase + that phase's activations
    denoise act = ACT_MB_PER_TOKEN[arch]    * latent tokens     (x2 for an fp32 transformer)
    decode act  = DECODE_MB_PER_PIXEL_FRAME * width*height*frames (x VAE_TILING_FACTOR with VAE tiling;
                                                                   the VAE always runs in fp32 here)
    tokens      = ((frames-1)//4 + 1) * ceil(height/s) * ceil(width/s),  s = 16 (A14B, Wan2.1: VAE 8x,
                                                                          patch 2), 32 (TI2V-5B: 16x, 2)

Which weights are on the GPU depends on the mode (``pipelines.py`` ``_place``):

- ``resident`` (``pipe.to("cuda")``): every component, all the time:
  ``peak = all weights + max(phase activations)``.
- ``model`` (``enable_model_cpu_offload``): one component at a time (accelerate offloads the previous
  one before loading the next): ``peak = max(TE + TE act, one transformer + denoise act, VAE + decode act)``.
- ``group`` (block-level, one block per group, CUDA streams): a few blocks (current + prefetched + one
  for embeddings/head) plus activations; the text encoder keeps its 2 GB embedding table on the GPU.
- ``sequential`` (``enable_sequential_cpu_offload``): one leaf module at a time (tiny), plus activations.

    estimate_mb = ceil((max phase peak + CUDA_CONTEXT_MB) * correction * (1 + SAFETY_MARGIN))

``correction`` is 1.0 unless a :class:`PeakBook` has learned, from measured peaks, how far off the model
is for that (architecture, mode, dtype, tiling). Everything is MiB (2**20 bytes); "GB" in the sources
below is 10**9 bytes, converted with :data:`GB`.

Sources of the constants (each also at its definition):

- [M1] measured on an H200, real diffusers configs with random bf16 weights, torch peak allocated:
  TI2V-5B at 1280x704x121, one transformer CFG step, resident: 14.4 GiB; its VAE decode in fp32:
  23.8 GiB (11.9 GiB in bf16); one A14B expert forward at 1280x720x81 (75,600 tokens): 34.8 GiB.
- [P1] published, Wan2.2 README (original code, not diffusers): TI2V-5B 720p on an RTX 4090 with
  offload peaks at 22.9 GB; T2V-A14B 720p on one GPU with offload at 59.8 GB. Sanity bounds only.
- [W] checkpoint sizes: TI2V-5B transformer ~10 GB bf16, UMT5-XXL ~11 GB bf16, each A14B expert
  ~28 GB bf16, Wan2.1 T2V-1.3B transformer ~2.8 GB bf16, Wan2.1 VAE ~0.5 GB fp32 (127M parameters),
  Wan2.2 VAE ~2.8 GB fp32 (Wan2.2_VAE.pth).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from daemon.fsutil import atomic_write_json, read_json
from daemon.models import ARCHITECTURES, I2V_A14B, T2V_A14B, T2V_SINGLE, TI2V_5B, TWO_EXPERT_ARCHITECTURES

MODES = ("resident", "model", "group", "sequential")  # fastest first
MODE_ALIASES = {"none": "resident"}  # daemon/policy.py's OFFLOAD_LADDER calls resident "none"

MIB = 1 << 20
GB = 1e9 / MIB  # MiB per (decimal) GB, for the checkpoint sizes quoted in GB
GIB = 1024  # MiB per GiB

# ---- constants ----------------------------------------------------------------------------------

SAFETY_MARGIN = 0.10  # allocator fragmentation, cuDNN/cuBLAS workspaces, driver differences
CUDA_CONTEXT_MB = 512  # CUDA context + kernels (lazy loading): in NVML's "used", not in torch's peak [M1]

# Weights, bf16, MiB [W]. One entry per transformer (the A14B models run two experts, one at a time).
TRANSFORMER_MB = {
    TI2V_5B: 10 * GB,  # ~10 GB bf16 (5B parameters)
    T2V_A14B: 28 * GB,  # ~28 GB bf16 per expert (14B parameters)
    I2V_A14B: 28 * GB,
    T2V_SINGLE: 2.8 * GB,  # Wan2.1 T2V-1.3B
}
EXPERTS = {arch: 2 if arch in TWO_EXPERT_ARCHITECTURES else 1 for arch in ARCHITECTURES}
TRANSFORMER_BLOCKS = {TI2V_5B: 30, T2V_A14B: 40, I2V_A14B: 40, T2V_SINGLE: 30}  # num_layers in the configs
TEXT_ENCODER_MB = 11 * GB  # UMT5-XXL encoder, ~11 GB bf16 [W]
TEXT_ENCODER_EMBEDDING_MB = 256384 * 4096 * 2 / MIB  # its shared embedding table (vocab x d_model, bf16)
TEXT_ENCODER_BLOCKS = 24  # UMT5-XXL encoder layers
TEXT_ENCODER_ACT_MB = 256  # 512 prompt tokens x d_model 4096: small, rounded up generously
VAE_MB = {  # fp32 (pipelines.py keeps the VAE in fp32) [W]
    TI2V_5B: 2.8 * GB,  # Wan2.2 VAE (48 channels)
    T2V_A14B: 0.508 * GB,  # Wan2.1 VAE (16 channels), 127M parameters
    I2V_A14B: 0.508 * GB,
    T2V_SINGLE: 0.508 * GB,
}

# Denoising activations per latent token, bf16, one forward (diffusers runs the CFG branches one after
# the other). Derived from [M1] by subtracting the weights from the measured forward peak:
#   TI2V-5B: (14.4 GiB - 10 GB) / 27,280 tokens (31 x 22 x 40) = 0.191 MiB/token. Higher than the A14B
#            per token although dim is 3072 vs 5120: TI2V-5B (expand_timesteps) keeps a per-token
#            timestep modulation (tokens x 6*dim), the A14B a per-sample one.
#   A14B:    (34.8 GiB - 28 GB) / 75,600 tokens (21 x 45 x 80) = 0.118 MiB/token.
#   wan-t2v: not measured; the A14B figure scaled by hidden size (1536 / 5120).
ACT_MB_PER_TOKEN = {
    TI2V_5B: (14.4 * GIB - 10 * GB) / 27_280,
    T2V_A14B: (34.8 * GIB - 28 * GB) / 75_600,
    I2V_A14B: (34.8 * GIB - 28 * GB) / 75_600,
    T2V_SINGLE: (34.8 * GIB - 28 * GB) / 75_600 * 1536 / 5120,
}
SPATIAL_PER_TOKEN = {TI2V_5B: 32, T2V_A14B: 16, I2V_A14B: 16, T2V_SINGLE: 16}  # VAE stride x patch size
TEMPORAL_STRIDE = 4  # latent frames = (frames - 1) // 4 + 1

# VAE decode activations per output pixel x frame, fp32: [M1] TI2V-5B decode at 1280x704x121 peaks at
# 23.8 GiB including its 2.8 GB of weights -> (23.8 GiB - 2.8 GB) / 109,045,760 = 0.000199 MiB (~209 bytes).
# The Wan2.1 VAE (A14B, wan-t2v) is narrower and was not measured: the same figure is used (conservative;
# a PeakBook corrects it). bf16 would halve it ([M1]: 11.9 GiB), but this daemon decodes in fp32.
DECODE_MB_PER_PIXEL_FRAME = (23.8 * GIB - 2.8 * GB) / (1280 * 704 * 121)
# VAE tiling (diffusers enable_tiling: 256 px tiles) decodes tile by tile. Taken as halving the decode
# activations, which is conservative (the real saving grows with resolution); a PeakBook learns the rest.
VAE_TILING_FACTOR = 0.5

# Group offload (block_level, num_blocks_per_group=1, use_stream=True): the running block, the one being
# prefetched on the side stream, and one block's worth for the modules outside the blocks (patch and
# condition embeddings, time projection, head).
GROUP_BLOCKS_ON_GPU = 3
# Sequential offload moves one leaf module at a time: the biggest transformer leaf is an A14B FFN linear
# (5120 x 13824 bf16 = 135 MiB), the biggest text-encoder leaf the 2 GB embedding table, VAE convs tiny.
SEQUENTIAL_TRANSFORMER_MB = 256
SEQUENTIAL_VAE_MB = 64

FP8_WEIGHT_FACTOR = 0.5  # layerwise fp8 storage (compute in bf16): transformer weights take half
DTYPE_FACTOR = {"bf16": 1.0, "fp16": 1.0, "fp32": 2.0}  # weights and transformer activations vs bf16

# Tiny random-weight test models (daemon/tiny.py: hidden 32, 2 layers, VAE base_dim 4): a few MB.
TINY_WEIGHTS_MB = 16
TINY_ACT_MB_PER_TOKEN = 0.002
TINY_DECODE_MB_PER_PIXEL_FRAME = 1e-4


def latent_tokens(architecture: str, width: int, height: int, frames: int) -> int:
    s = SPATIAL_PER_TOKEN[architecture]
    return ((frames - 1) // TEMPORAL_STRIDE + 1) * math.ceil(height / s) * math.ceil(width / s)


def _mode(mode: str) -> str:
    mode = MODE_ALIASES.get(mode, mode)
    if mode not in MODES:
        raise ValueError(f"unknown offload mode {mode!r} (one of {', '.join(MODES)})")
    return mode


def phase_peaks_mb(
    architecture: str,
    width: int,
    height: int,
    frames: int,
    mode: str,
    *,
    dtype: str = "bf16",
    fp8: bool = False,
    vae_tiling: bool = False,
    tiny: bool = False,
) -> dict[str, float]:
    """The raw model: MiB on the GPU at each phase's peak (no CUDA context, margin or correction)."""
    if architecture not in TRANSFORMER_MB:
        raise ValueError(f"unknown architecture {architecture!r} (one of {', '.join(ARCHITECTURES)})")
    if dtype not in DTYPE_FACTOR:
        raise ValueError(f"unknown dtype {dtype!r} (one of {', '.join(DTYPE_FACTOR)})")
    mode = _mode(mode)
    tokens = latent_tokens(architecture, width, height, frames)
    pixel_frames = width * height * frames
    tiling = VAE_TILING_FACTOR if vae_tiling else 1.0
    if tiny:
        act = TINY_ACT_MB_PER_TOKEN * tokens
        decode = TINY_DECODE_MB_PER_PIXEL_FRAME * pixel_frames * tiling
        return {"text_encode": TINY_WEIGHTS_MB, "denoise": TINY_WEIGHTS_MB + act, "decode": TINY_WEIGHTS_MB + decode}
    d = DTYPE_FACTOR[dtype]
    transformer = TRANSFORMER_MB[architecture] * d * (FP8_WEIGHT_FACTOR if fp8 else 1.0)
    text_encoder = TEXT_ENCODER_MB * d
    vae = VAE_MB[architecture]
    act = ACT_MB_PER_TOKEN[architecture] * tokens * d
    decode = DECODE_MB_PER_PIXEL_FRAME * pixel_frames * tiling
    if mode == "resident":
        weights = transformer * EXPERTS[architecture] + text_encoder + vae
        return {"text_encode": weights + TEXT_ENCODER_ACT_MB, "denoise": weights + act, "decode": weights + decode}
    if mode == "model":
        return {"text_encode": text_encoder + TEXT_ENCODER_ACT_MB, "denoise": transformer + act, "decode": vae + decode}
    if mode == "group":
        te_block = (text_encoder - TEXT_ENCODER_EMBEDDING_MB * d) / TEXT_ENCODER_BLOCKS
        te = TEXT_ENCODER_EMBEDDING_MB * d + GROUP_BLOCKS_ON_GPU * te_block
        blocks = GROUP_BLOCKS_ON_GPU * transformer / TRANSFORMER_BLOCKS[architecture]
        return {"text_encode": te + TEXT_ENCODER_ACT_MB, "denoise": blocks + act, "decode": vae + decode}
    # sequential
    return {
        "text_encode": TEXT_ENCODER_EMBEDDING_MB * d + TEXT_ENCODER_ACT_MB,
        "denoise": SEQUENTIAL_TRANSFORMER_MB * d + act,
        "decode": SEQUENTIAL_VAE_MB + decode,
    }


def weights_mb(architecture: str, *, dtype: str = "bf16", fp8: bool = False, tiny: bool = False) -> float:
    """Every weight of a pipeline (each transformer, the text encoder, the VAE), MiB: what a warm pipeline holds
    in memory, on the device or, offloaded, in the host's RAM."""
    if tiny:
        return float(TINY_WEIGHTS_MB)
    transformer = TRANSFORMER_MB[architecture] * DTYPE_FACTOR[dtype] * (FP8_WEIGHT_FACTOR if fp8 else 1.0)
    return transformer * EXPERTS[architecture] + TEXT_ENCODER_MB * DTYPE_FACTOR[dtype] + VAE_MB[architecture]


def device_weights_mb(
    architecture: str, mode: str, *, dtype: str = "bf16", fp8: bool = False, tiny: bool = False
) -> float:
    """What a warm pipeline keeps on the GPU between jobs, MiB: all its weights when resident, none when
    offloaded (model, group and sequential offload hand every component back to the CPU at the end of a call)."""
    return weights_mb(architecture, dtype=dtype, fp8=fp8, tiny=tiny) if _mode(mode) == "resident" else 0.0


def book_key(architecture: str, mode: str, dtype: str = "bf16", vae_tiling: bool = False, *, tiny: bool = False) -> str:
    """PeakBook key. Tiny models get their own keys (``tiny:<arch>``): their peaks say nothing about real ones."""
    arch = f"tiny:{architecture}" if tiny else architecture
    return f"{arch}|{_mode(mode)}|{dtype}|{'tiled' if vae_tiling else 'full'}"


def estimate_mb(
    architecture: str,
    width: int,
    height: int,
    frames: int,
    mode: str,
    *,
    dtype: str = "bf16",
    fp8: bool = False,
    vae_tiling: bool = False,
    book: PeakBook | None = None,
    tiny: bool = False,
) -> int:
    """Peak GPU memory (MiB, rounded up, margin included) of one job in one offload mode.

    ``mode`` is one of :data:`MODES` (``"none"`` is accepted for ``"resident"``). Raises ValueError on an
    unknown architecture, mode or dtype.
    """
    raw = (
        max(
            phase_peaks_mb(
                architecture, width, height, frames, mode, dtype=dtype, fp8=fp8, vae_tiling=vae_tiling, tiny=tiny
            ).values()
        )
        + CUDA_CONTEXT_MB
    )
    correction = book.correction(book_key(architecture, mode, dtype, vae_tiling, tiny=tiny)) if book else 1.0
    return math.ceil(raw * correction * (1 + SAFETY_MARGIN))


# ---- learning from measured peaks ---------------------------------------------------------------


class PeakBook:
    """Learned corrections of :func:`estimate_mb`, one per :func:`book_key`, persisted as JSON.

    ``correction = measured peak / the model's raw figure`` (raw = before margin and correction), as an
    exponential moving average (``ALPHA`` per record, starting from 1.0) clamped to [0.5, 3]: one odd
    measurement moves the estimate half way, a few consistent ones bring it to them. The margin stays on
    top of the learned figure.

    ``measured_mb`` should be the worker process's own peak as the GPU sees it (NVML per-process used
    memory, or torch ``max_memory_reserved`` + the CUDA context), not the whole device's used memory when
    several workers share a GPU.
    """

    ALPHA = 0.5
    LOW, HIGH = 0.5, 3.0
    VERSION = 1

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, Any]] = {}
        if self.path is not None and self.path.exists():
            try:
                data = read_json(self.path)
                entries = data.get("entries", {}) if isinstance(data, dict) else {}
                self._entries = {
                    k: dict(v)
                    for k, v in entries.items()
                    if isinstance(v, dict) and isinstance(v.get("correction"), (int, float))
                }
            except (OSError, ValueError) as exc:
                logger.warning("peakbook.unreadable path={} error={}; starting afresh", self.path, exc)

    def correction(self, key: str) -> float:
        entry = self._entries.get(key)
        return float(entry["correction"]) if entry else 1.0

    def record(self, key: str, estimate_mb: int, measured_mb: float, *, correction_used: float | None = None) -> float:
        """Learn from one run: ``estimate_mb`` is what :func:`estimate_mb` said for it (with this book, so
        with the correction in force then: pass ``correction_used`` if that differs from the current one,
        1.0 for an estimate made without a book). Persists the book; returns the new correction."""
        if estimate_mb <= 0 or measured_mb <= 0:
            raise ValueError(f"estimate ({estimate_mb}) and measurement ({measured_mb}) must be positive")
        with self._lock:
            old = self.correction(key)
            used = old if correction_used is None else correction_used
            raw = estimate_mb / (1 + SAFETY_MARGIN) / used
            sample = min(self.HIGH, max(self.LOW, measured_mb / raw))
            new = min(self.HIGH, max(self.LOW, (1 - self.ALPHA) * old + self.ALPHA * sample))
            prev = self._entries.get(key, {})
            self._entries[key] = {
                "correction": round(new, 6),
                "samples": int(prev.get("samples", 0)) + 1,
                "last_estimate_mb": int(estimate_mb),
                "last_measured_mb": round(float(measured_mb), 1),
            }
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_json(self.path, {"version": self.VERSION, "entries": self._entries})
            return new

    def entries(self) -> dict[str, dict[str, Any]]:
        return {k: dict(v) for k, v in self._entries.items()}


# ---- the planner --------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobDemand:
    """What the planner needs to know about a job."""

    architecture: str
    width: int
    height: int
    frames: int
    tiny: bool = False
    dtype: str = "bf16"

    @classmethod
    def from_record(cls, record: Any) -> JobDemand:
        """From a :class:`daemon.jobs.JobRecord` (its located model and resolved parameters)."""
        p = record.params
        return cls(record.model.architecture, p.width, p.height, p.frames, tiny=record.model.tiny)


@dataclass(frozen=True)
class Plan:
    mode: str  # one of MODES
    vae_tiling: bool
    fp8: bool
    estimate_mb: int

    @property
    def offload(self) -> str:
        """The job parameter ``offload`` (daemon/policy.py's names: ``none`` for resident)."""
        return "none" if self.mode == "resident" else self.mode


OVERRIDES = ("auto", "none", "resident", "model", "group", "sequential")


@dataclass(frozen=True)
class WarmMode:
    """How a worker holds a model warm: the offload mode its pipeline was placed with, and its weight precision
    (each is its own cache entry in the worker: another mode or precision means loading the model again)."""

    mode: str  # one of MODES
    fp8: bool = False


def candidates(
    *, override: str = "auto", allow_lossy: bool = False, warm: WarmMode | None = None
) -> list[tuple[str, bool, bool]]:
    """(mode, vae_tiling, fp8) in the order tried: fastest first, lossless before lossy (fp8); the ``warm``
    pipeline's own (mode, fp8), when allowed, before all of them."""
    if override not in OVERRIDES:
        raise ValueError(f"unknown offload override {override!r} (one of {', '.join(OVERRIDES)})")
    modes = MODES if override == "auto" else (_mode(override),)
    order = [(m, tiling, False) for m in modes for tiling in (False, True)]
    if allow_lossy:
        order += [(m, tiling, True) for m, tiling, _ in order]
    if warm is not None:
        first = [c for c in order if (c[0], c[2]) == (_mode(warm.mode), warm.fp8)]
        order = first + [c for c in order if c not in first]
    return order


def plan_for(
    job: JobDemand,
    free_mb: int,
    *,
    override: str = "auto",
    allow_lossy: bool = False,
    book: PeakBook | None = None,
    warm: WarmMode | None = None,
) -> Plan | None:
    """The fastest (mode, tiling, fp8) whose estimate fits ``free_mb``; None when none does.

    Order: resident, resident+tiling, model, model+tiling, group, group+tiling, sequential,
    sequential+tiling, then the same with fp8 weights if ``allow_lossy``. ``override`` (``none`` /
    ``resident``, ``model``, ``group``, ``sequential``) restricts it to that mode (tiling and, if allowed,
    fp8 are still tried). ``warm``: the mode the job's model is already loaded in on this worker; tried
    first (with and without tiling) when allowed, because another mode means loading the model a second time.
    """
    for mode, tiling, fp8 in candidates(override=override, allow_lossy=allow_lossy, warm=warm):
        est = _estimate(job, mode, tiling, fp8, book)
        if est <= free_mb:
            return Plan(mode, tiling, fp8, est)
    return None


def _estimate(job: JobDemand, mode: str, tiling: bool, fp8: bool, book: PeakBook | None) -> int:
    return estimate_mb(
        job.architecture,
        job.width,
        job.height,
        job.frames,
        mode,
        dtype=job.dtype,
        fp8=fp8,
        vae_tiling=tiling,
        book=book,
        tiny=job.tiny,
    )


def strongest_estimate_mb(
    job: JobDemand, *, override: str = "auto", allow_lossy: bool = False, book: PeakBook | None = None
) -> int:
    """The smallest estimate over every allowed candidate (what an empty GPU must at least hold)."""
    return min(
        _estimate(job, mode, tiling, fp8, book)
        for mode, tiling, fp8 in candidates(override=override, allow_lossy=allow_lossy)
    )


def optimizations(plan: Plan) -> list[str]:
    """Names as daemon/pipelines.py reports them in ``optimizations_applied``."""
    out = [] if plan.mode == "resident" else [f"offload:{plan.mode}"]
    if plan.vae_tiling:
        out.append("vae_tiling")
    if plan.fp8:
        out.append("fp8_weights")
    return out
