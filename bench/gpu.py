"""Wan2.2 on one CUDA GPU: the real TI2V-5B architecture, one job timed by a plain diffusers loop and through
the daemon's worker backend, with each speed option and offload mode. One invocation, about 8 minutes:

    python bench/gpu.py [--steps 4] [--size 1280x704] [--frames 121] [--budget-s 480] [--a14b] [--out DIR]
    python bench/gpu.py --smoke     # the same code path on a CPU with tiny models, in seconds

The GPU machine has no network, so nothing is downloaded: the transformer, VAE and text encoder are built
from their published configs with random weights, written with save_pretrained to a temporary folder on
local disk and loaded back with from_pretrained, as the daemon loads models. Random weights make noise
videos, but the shapes (so the FLOPs, the memory and the VAE's work) are the real model's. The text encoder
has UMT5-XXL's width and only --text-layers of its 24 layers (default 2): prompts are encoded once per job,
so denoising is unaffected, while load time and resident VRAM come out lower by the missing layers (the
header says by how much).

Rows, in order; each is its own try, so a failing option prints its error and the rest still run:
  build         construct on the GPU (bf16, VAE fp32) + save_pretrained
  plain         WanPipeline.from_pretrained + .to(device) + pipe(...) + export_to_video
  daemon        DiffusersWanBackend.run with the payload the daemon sends: cold (loads), then warm
  attention     params.attention_backend cudnn, flash, flash_3, sage (native: the warm run); not installed: said
  cache         --cache-steps steps without, then with cache first_block@0.05
  compile       params.compile twice: the first run compiles, the second is warm
  offload       model, group, each loaded fresh
  cap24         model, group, none under torch.cuda.set_per_process_memory_fraction(24 GiB), an allocator cap
                in this process only (no GPU setting changes); an OOM is a result ("OOM"), not a crash
  vae_tiling    offload none, VAE tiled; then offload sequential (--sequential-steps, or --skip-sequential)
  a14b          (--a14b) one A14B expert (40 layers, ~14B) with the Wan2.1 VAE, 1280x720x81, 2 steps, offload
                none; 240 s of --budget-s are kept back for it

Columns: load s, s/step (denoise / steps), denoise s (prompt encoding included), VAE decode s, MP4 encode s,
total s (wall time of the run), peak VRAM GiB (max_memory_allocated during the pipeline call). Step stamps
are taken after a CUDA synchronize, so the denoise/decode split is exact. A speed option the backend does
not apply (missing from optimizations_applied) is marked "ignored". Runs that would not end within
--budget-s are skipped and say so. Every figure goes to $OUT/gpu_results.json (./bench-gpu-results.json
without $OUT), rewritten after each row; a markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import itertools
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "a red fox trots through fresh snow at dawn, low sun, cinematic, slow motion"
CAP_GIB = 24
A14B_RESERVE_S = 240.0  # build (~28 GB written), load, 2 steps at 1280x720x81 and the decode, roughly
# daemon/tiny.py's character-level sentencepiece vocabulary: a tokenizer built locally, no download.
VOCAB = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)] + [
    (c, -2.0) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?-'"
]

# Published configs: Wan-AI/Wan2.2-TI2V-5B-Diffusers, Wan-AI/Wan2.2-T2V-A14B-Diffusers (one expert),
# google/umt5-xxl's encoder. latents_mean/std are zeros/ones: they only shift and scale random latents.
TI2V_5B_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=24,
    attention_head_dim=128,
    in_channels=48,
    out_channels=48,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=14336,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
A14B_TRANSFORMER = dict(
    TI2V_5B_TRANSFORMER, num_attention_heads=40, ffn_dim=13824, num_layers=40, in_channels=16, out_channels=16
)
WAN22_VAE = dict(
    base_dim=160,
    decoder_base_dim=256,
    z_dim=48,
    in_channels=12,
    out_channels=12,
    is_residual=True,
    patch_size=2,
    scale_factor_spatial=16,
    scale_factor_temporal=4,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    temperal_downsample=[False, True, True],
    latents_mean=[0.0] * 48,
    latents_std=[1.0] * 48,
)
WAN21_VAE: dict[str, Any] = {}  # AutoencoderKLWan's defaults are the Wan2.1 16-channel VAE
UMT5_XXL = dict(
    vocab_size=256384,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_heads=64,
    num_layers=24,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
)
# --smoke: the same architectures at daemon/tiny.py's sizes.
SMOKE_TRANSFORMER = dict(
    num_layers=2,
    num_attention_heads=2,
    attention_head_dim=16,
    ffn_dim=64,
    text_dim=32,
    freq_dim=32,
    rope_max_seq_len=64,
)
SMOKE_VAE = {
    True: dict(base_dim=3, dim_mult=[1, 1, 1, 1], num_res_blocks=1),  # keyed by a14b
    False: dict(base_dim=4, decoder_base_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1),
}
SMOKE_UMT5 = dict(
    vocab_size=len(VOCAB), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8
)

COLUMNS = [
    ("run", 36, "run"),
    ("status", 8, "status"),
    ("load_s", 7, "load s"),
    ("per_step_s", 7, "s/step"),
    ("denoise_s", 8, "denoise"),
    ("decode_s", 7, "decode"),
    ("encode_s", 7, "encode"),
    ("total_s", 8, "total s"),
    ("peak_vram_gib", 8, "VRAM GiB"),
]


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def is_oom(exc: BaseException) -> bool:
    return (
        isinstance(exc, torch.OutOfMemoryError)
        or "out of memory" in str(exc).lower()
        or getattr(exc, "category", None) == "out_of_memory"
    )  # a daemon JobError


@contextlib.contextmanager
def built_on(device: str, dtype: Any):
    """Construct modules straight on ``device`` in ``dtype``: no fp32 copy in host RAM, no slow CPU init."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_model(folder: Path, *, a14b: bool, smoke: bool, text_layers: int, device: str) -> dict[str, Any]:
    """Build the pipeline with random weights, save_pretrained it into ``folder``; return facts and timings."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    t0 = time.perf_counter()
    transformer_cfg = dict(A14B_TRANSFORMER if a14b else TI2V_5B_TRANSFORMER, **(SMOKE_TRANSFORMER if smoke else {}))
    vae_cfg = dict(WAN21_VAE if a14b else WAN22_VAE, **(SMOKE_VAE[a14b] if smoke else {}))
    text_cfg = SMOKE_UMT5 if smoke else dict(UMT5_XXL, num_layers=text_layers)
    # bf16 as the daemon loads them on a GPU; fp32 on a CPU, as it does there.
    with built_on(device, torch.float32 if smoke else torch.bfloat16):
        transformer = WanTransformer3DModel(**transformer_cfg)
        text_encoder = UMT5EncoderModel(UMT5Config(**text_cfg))
    with built_on(device, torch.float32):  # the daemon keeps the VAE in fp32 (bf16 decode visibly degrades)
        vae = AutoencoderKLWan(**vae_cfg)
    # Wan2.2's diffusers repos ship UniPC in flow mode; the daemon replaces flow_shift per job.
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    pipe = WanPipeline(
        tokenizer=T5Tokenizer(vocab=VOCAB, extra_ids=0),
        text_encoder=text_encoder,
        vae=vae,
        scheduler=scheduler,
        transformer=transformer,
        transformer_2=None,
        boundary_ratio=None,
        expand_timesteps=not a14b,
    )  # TI2V-5B: per-token timesteps
    synchronize()
    t1 = time.perf_counter()
    pipe.save_pretrained(folder)
    t2 = time.perf_counter()
    layer_params = sum(p.numel() for p in text_encoder.encoder.block[0].parameters())
    facts = {
        "construct_s": t1 - t0,
        "save_s": t2 - t1,
        "disk_gb": sum(p.stat().st_size for p in folder.rglob("*.safetensors")) / 1e9,
        "transformer_params": sum(p.numel() for p in transformer.parameters()),
        "text_layers": text_cfg["num_layers"],
        # bf16 bytes of the UMT5-XXL layers left out: what real resident VRAM and load would add.
        "text_missing_gib": 0.0 if smoke else (24 - text_layers) * layer_params * 2 / 2**30,
        "transformer": {k: list(v) if isinstance(v, tuple) else v for k, v in transformer_cfg.items()},
        "vae": {k: v for k, v in vae_cfg.items() if not k.startswith("latents_")},
    }
    del pipe, transformer, text_encoder, vae
    free_memory()
    return facts


def count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n:,}"


def fmt(value: Any, width: int) -> str:
    if value is None:
        return "-".rjust(width)
    if isinstance(value, float):
        return f"{value:.2f}".rjust(width)
    return str(value)[:width].ljust(width)


class Bench:
    """The rows measured so far, printed as they come, and what later runs' time is estimated from."""

    def __init__(self, args: argparse.Namespace, device: str, out: Path, results_path: Path) -> None:
        self.args, self.device, self.out, self.results_path = args, device, out, results_path
        self.started = time.perf_counter()
        self.meta: dict[str, Any] = {}
        self.rows: list[dict[str, Any]] = []
        self.reference: dict[str, float] | None = None  # from the first daemon runs: load, fixed, per step
        self.jobs = 0
        self.reserve_s = A14B_RESERVE_S if args.a14b else 0.0  # kept back from the 5B rows for --a14b

    def header(self) -> None:
        print(
            "  ".join(fmt(title, width) if key == "run" else title.rjust(width) for key, width, title in COLUMNS)
            + "  notes",
            flush=True,
        )

    def add(self, section: str, run: str, status: str = "ok", note: str = "", **figures: Any) -> dict[str, Any]:
        row = {"section": section, "run": run, "status": status, "note": note, **figures}
        self.rows.append(row)
        print("  ".join(fmt(row.get(key), width) for key, width, _ in COLUMNS) + f"  {note}", flush=True)
        self.save()
        return row

    def save(self) -> None:
        """Rewritten after every row: a run cut short by a timeout still leaves every figure so far."""
        self.meta["elapsed_s"] = round(time.perf_counter() - self.started, 1)
        self.results_path.write_text(json.dumps({"meta": self.meta, "rows": self.rows}, indent=1, default=str))

    def set_reference(self, cold: dict[str, Any], warm: dict[str, Any]) -> None:
        """Later runs are estimated from the cold run's load and the warm run's steps and the rest."""
        if cold.get("status") == "ok" and warm.get("status") == "ok":
            self.reference = {
                "load_s": cold["load_s"] or 0.0,
                "per_step_s": warm["per_step_s"],
                "fixed_s": warm["total_s"] - warm["denoise_s"] - (warm["load_s"] or 0.0),
            }

    def fits(self, steps: int, *, load: bool = False, step_factor: float = 1.0, extra: float = 0.0) -> str | None:
        """None if a run of ``steps`` steps should end within --budget-s, else why it is skipped."""
        ref = self.reference
        if ref is None:
            return None
        estimate = ref["fixed_s"] + steps * ref["per_step_s"] * step_factor + (ref["load_s"] if load else 0) + extra
        left = self.args.budget_s - self.reserve_s - (time.perf_counter() - self.started)
        return None if estimate <= left else f"skipped: about {estimate:.0f} s needed, {left:.0f} s left of --budget-s"

    def failed(self, section: str, run: str, exc: BaseException, backend: Any = None) -> dict[str, Any]:
        if backend is not None:
            backend._cache.clear()  # a pipeline that failed mid-run may hold memory, hooks or compiled graphs
        free_memory()
        message = " ".join(str(exc).split())[:240]
        return self.add(section, run, "OOM" if is_oom(exc) else "error", f"{type(exc).__name__}: {message}")

    def run_plain(self, folder: Path, params: dict[str, Any]) -> dict[str, Any]:
        """The obvious diffusers script: load, move to the device, generate, export."""
        from diffusers import WanPipeline
        from diffusers.utils import export_to_video

        t0 = time.perf_counter()
        dtype = {"default": torch.bfloat16, "vae": torch.float32} if self.device == "cuda" else torch.float32
        pipe = WanPipeline.from_pretrained(folder, dtype=dtype).to(self.device)
        pipe.set_progress_bar_config(disable=True)
        synchronize()
        t1 = time.perf_counter()
        stamps: list[float] = []

        def on_step_end(_pipe, _step, _timestep, callback_kwargs):
            synchronize()  # the step's kernels have finished, not just been queued
            stamps.append(time.perf_counter())
            return callback_kwargs

        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t2 = time.perf_counter()
        with torch.inference_mode():
            frames = pipe(
                prompt=params["prompt"],
                negative_prompt=params["negative_prompt"],
                height=params["height"],
                width=params["width"],
                num_frames=params["frames"],
                num_inference_steps=params["steps"],
                guidance_scale=params["guidance_scale"],
                callback_on_step_end=on_step_end,
                generator=torch.Generator(device="cpu").manual_seed(params["seed"]),
            ).frames[0]
        t3 = time.perf_counter()
        peak = torch.cuda.max_memory_allocated() / 2**30 if self.device == "cuda" else None
        export_to_video(list(frames), str(self.out / "plain.mp4"), fps=params["fps"])
        t4 = time.perf_counter()
        del pipe, frames
        free_memory()
        steps = params["steps"]
        return self.add(
            "plain",
            "plain diffusers loop",
            load_s=t1 - t0,
            per_step_s=(stamps[-1] - t2) / steps,
            denoise_s=stamps[-1] - t2,
            decode_s=t3 - stamps[-1],
            encode_s=t4 - t3,
            total_s=t4 - t0,
            peak_vram_gib=peak,
            steps=steps,
            step_times=[b - a for a, b in itertools.pairwise([t2, *stamps])],
        )

    def run_daemon(
        self,
        backend: Any,
        model: dict[str, Any],
        base: dict[str, Any],
        section: str,
        run: str,
        *,
        expect: str | None = None,
        baseline: dict[str, Any] | None = None,
        step_factor: float = 1.0,
        extra_s: float = 0.0,
        remark: str = "",
        **overrides: Any,
    ) -> dict[str, Any]:
        """One job through DiffusersWanBackend (generate, then finish). ``expect``: the optimizations_applied entry
        (prefix) that
        shows the option was applied; ``baseline``: a row to compare the denoise time per step with."""
        params = dict(base, **overrides)
        why = self.fits(params["steps"], load=not backend._cache, step_factor=step_factor, extra=extra_s)
        if why:
            return self.add(section, run, "skipped", why)
        self.jobs += 1
        stamps: list[float] = []

        def report(phase: str, step: int | None = None, total: int | None = None) -> None:
            if step is not None and phase == "denoising":
                synchronize()  # called from the step callback: stamp when the step's kernels are done
                stamps.append(time.perf_counter())

        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", run).strip("-")
        from daemon.worker.protocol import payload_from_wire

        job = payload_from_wire(
            {
                "id": f"bench-{self.jobs}",
                "token": "bench",
                "attempt": 1,
                "model": model,
                "params": params,
                "input_image": None,
                "video_tmp": str(self.out / f"{self.jobs:02d}-{slug}.tmp.mp4"),
            }
        )
        t0 = time.perf_counter()
        try:
            result = backend.finish(backend.generate(job, report, lambda: False))
        except Exception as exc:
            return self.failed(section, run, exc, backend)
        wall = time.perf_counter() - t0
        timings, steps = result.timings, params["steps"]
        # stamps[0] is the "step 0" event, sent just before the pipeline call; the last, after the last step.
        denoise = stamps[-1] - stamps[0] if len(stamps) > 1 else timings["denoise"]
        decode = timings["denoise"] + timings["vae_decode"] - denoise
        applied = list(result.optimizations_applied or [])
        status, note = "ok", ", ".join(applied)
        if expect and not any(a.startswith(expect) for a in applied):
            status = "ignored"
            note = f"no {expect}* in optimizations_applied [{note}]: not applied by this daemon version or plan"
        if baseline and baseline.get("per_step_s") and status == "ok":
            note += f"  ({baseline['per_step_s'] / (denoise / steps):.2f}x the speed of {baseline['run']})"
        peak_mb = result.peak_vram_usage_mb
        return self.add(
            section,
            run,
            status,
            f"{note} {remark}".strip(),
            load_s=timings.get("model_load"),
            per_step_s=denoise / steps,
            denoise_s=denoise,
            decode_s=decode,
            encode_s=timings.get("encode"),
            total_s=wall,
            peak_vram_gib=peak_mb / 1024 if peak_mb is not None else None,
            steps=steps,
            step_times=[b - a for a, b in itertools.pairwise(stamps)],
            applied=applied,
            daemon_timings=timings,
            model_cache=result.model_cache,
            params={
                k: params.get(k)
                for k in ("offload", "vae_tiling", "compile", "cache", "attention_backend", "width", "height", "frames")
            },
        )

    def markdown(self) -> str:
        lines = ["| " + " | ".join(t for _, _, t in COLUMNS) + " | notes |", "|" + "---|" * (len(COLUMNS) + 1)]
        for row in self.rows:
            cells = [
                f"{v:.2f}" if isinstance(v, float) else str(v if v is not None else "-")
                for v in (row.get(k) for k, _, _ in COLUMNS)
            ]
            lines.append("| " + " | ".join(cells + [row["note"].replace("|", "/")]) + " |")
        return "\n".join(lines)


def attention_missing(name: str, device: str) -> str | None:
    """Why an attention backend cannot run here, or None (then the run itself shows whether it applied)."""
    if device != "cuda":
        return "needs a CUDA GPU"
    try:
        from daemon.worker.speed import attention_available

        return attention_available(name)
    except Exception:  # no such check in this daemon version (or it changed): let the run say what happens
        return None


def resolved_params(located: Any, args: argparse.Namespace, size: str, frames: int) -> tuple[dict, list[str]]:
    """The params dict the daemon sends for this job, plus the speed keys this daemon version does not resolve."""
    from daemon.jobspec.params import resolve_params
    from daemon.jobspec.spec import JobSpec

    spec = JobSpec(id="bench", prompt=PROMPT, size=size, frames=frames, steps=args.steps, guidance_scale=5.0, seed=0)
    params = resolve_params(spec, located.info, max_side=4096, max_frames=1000, max_steps=1000).model_dump(mode="json")
    missing = [k for k in ("compile", "cache", "attention_backend") if k not in params]
    params.update(offload="none", vae_tiling=False, fp8=False)
    for key, default in (("compile", False), ("cache", None), ("attention_backend", "native")):
        params.setdefault(key, default)
    return params, missing


def run_sections(bench: Bench, folder: Path, models_dir: Path) -> None:
    from daemon.models import locate
    from daemon.worker.backend import DiffusersWanBackend

    args, device, cuda = bench.args, bench.device, bench.device == "cuda"
    located = locate(str(folder), models_dir=models_dir, model_roots=[folder.parent])
    model = located.model_dump(mode="json")
    base, missing = resolved_params(located, args, args.size, args.frames)
    bench.meta["speed_keys_not_in_resolve_params"] = missing
    try:
        bench.run_plain(folder, base)
    except Exception as exc:
        bench.failed("plain", "plain diffusers loop", exc)

    # allow_cpu_for_real_models: the smoke model is tiny but loaded from a folder, which the daemon treats as real.
    backend = DiffusersWanBackend(
        device=device, models_dir=models_dir, max_cached_pipelines=2, allow_cpu_for_real_models=not cuda
    )
    bench.meta["backend"] = dataclasses.asdict(backend.describe())
    cold = bench.run_daemon(backend, model, base, "daemon", "daemon cold (loads)")
    warm = bench.run_daemon(backend, model, base, "daemon", "daemon warm (attention native)")
    bench.set_reference(cold, warm)

    for name in ("cudnn", "flash", "flash_3", "sage"):  # native: the warm run above
        why = attention_missing(name, device)
        if why:
            bench.add("attention", f"attention {name}", "n/a", f"not installed / unusable here: {why[:160]}")
            continue
        bench.run_daemon(
            backend,
            model,
            base,
            "attention",
            f"attention {name}",
            attention_backend=name,
            expect=f"attention:{name}",
            baseline=warm,
        )

    n = args.cache_steps
    no_cache = bench.run_daemon(backend, model, base, "cache", f"{n} steps, no cache", steps=n)
    bench.run_daemon(
        backend,
        model,
        base,
        "cache",
        f"{n} steps, cache first_block@0.05",
        steps=n,
        cache={"type": "first_block", "threshold": 0.05},
        expect="cache:first_block@",
        baseline=no_cache,
    )

    if args.no_compile:
        bench.add("compile", "compile", "skipped", "--no-compile")
    else:
        bench.run_daemon(
            backend,
            model,
            base,
            "compile",
            "compile (compiling run)",
            compile=True,
            expect="compile",
            extra_s=args.compile_estimate_s,
        )
        bench.run_daemon(
            backend, model, base, "compile", "compile (warm run)", compile=True, expect="compile", baseline=warm
        )
    backend._cache.clear()  # compiled modules and attention settings stay with a warm pipeline: start clean
    free_memory()

    # Offload modes, each loaded fresh (hooks are part of the warm pipeline); sequential last, it is the slowest.
    def offload_run(mode: str, section: str, label: str, **extra: Any) -> None:
        backend._cache.clear()
        free_memory()
        seq = mode == "sequential"
        bench.run_daemon(
            backend,
            model,
            base,
            section,
            label + (f", {args.sequential_steps} steps" if seq else ""),
            offload=mode,
            steps=args.sequential_steps if seq else args.steps,
            step_factor=3 if seq else 1.2,
            expect=extra.pop("expect", None if mode == "none" else f"offload:{mode}"),
            **extra,
        )

    if not cuda:
        bench.add("offload", "offload model/group/sequential", "n/a", "CUDA only (on a CPU the backend runs none)")
        bench.add("cap24", f"cap {CAP_GIB} GiB", "n/a", "CUDA only (a per-process allocator cap)")
    else:
        for mode in ("model", "group"):
            offload_run(mode, "offload", f"offload {mode}")
        missing_gib = bench.meta["model"]["text_missing_gib"]
        try:
            for mode in ("model", "group", "none"):
                backend._cache.clear()
                free_memory()
                # Set after emptying torch's cache, so that nothing reserved before counts against the cap.
                torch.cuda.set_per_process_memory_fraction(
                    min(1.0, CAP_GIB * 2**30 / torch.cuda.get_device_properties(0).total_memory)
                )
                offload_run(
                    mode,
                    "cap24",
                    f"cap {CAP_GIB} GiB, offload {mode}",
                    remark=f"(real text encoder: +{missing_gib:.1f} GiB resident)"
                    if mode == "none" and missing_gib
                    else "",
                )
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
    offload_run("none", "offload", "vae_tiling, offload none", vae_tiling=True, expect="vae_tiling")
    if cuda and not args.skip_sequential:
        offload_run("sequential", "offload", "offload sequential")
    backend._cache.clear()
    free_memory()


def run_a14b(bench: Bench, work: Path) -> None:
    """One A14B expert alone (the 5B folder is deleted first: both do not fit the device's disk comfortably)."""
    from daemon.models import locate
    from daemon.worker.backend import DiffusersWanBackend

    args, smoke = bench.args, bench.args.smoke
    left = args.budget_s - (time.perf_counter() - bench.started)
    if not smoke and left < A14B_RESERVE_S:
        bench.add(
            "a14b",
            "A14B expert",
            "skipped",
            f"skipped: {left:.0f} s left of --budget-s, about {A14B_RESERVE_S:.0f} s needed",
        )
        return
    shutil.rmtree(work / "models" / "wan2.2-ti2v-5b-random", ignore_errors=True)
    folder = work / "models" / "wan2.2-a14b-expert-random"
    try:
        facts = build_model(folder, a14b=True, smoke=smoke, text_layers=args.text_layers, device=bench.device)
        bench.meta["a14b_model"] = facts
        bench.add(
            "a14b",
            "build A14B expert",
            total_s=facts["construct_s"] + facts["save_s"],
            note=f"{count(facts['transformer_params'])} params; construct {facts['construct_s']:.1f} s + "
            f"save_pretrained {facts['save_s']:.1f} s, {facts['disk_gb']:.1f} GB",
        )
        located = locate(str(folder), models_dir=folder.parent, model_roots=[folder.parent])
        size, frames = ("64x64", 9) if smoke else ("1280x720", 81)
        params, _ = resolved_params(located, args, size, frames)
        params["steps"] = min(2, params["steps"])  # 28 GB of weights, 76k tokens a step: keep it short
        backend = DiffusersWanBackend(
            device=bench.device, models_dir=folder.parent, max_cached_pipelines=1, allow_cpu_for_real_models=smoke
        )
        bench.reference = None  # another model: no estimate from the 5B runs
        bench.run_daemon(backend, located.to_dict(), params, "a14b", f"A14B expert {size}x{frames}, none")
        backend._cache.clear()
    except Exception as exc:
        bench.failed("a14b", "A14B expert", exc)
    free_memory()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny models, 64x64x9, 2 steps: exercise every path")
    ap.add_argument("--steps", type=int, help="denoising steps per job (default 4; --smoke 2)")
    ap.add_argument("--size", help="WIDTHxHEIGHT (default 1280x704; --smoke 64x64)")
    ap.add_argument("--frames", type=int, help="4n+1 frames (default 121; --smoke 9)")
    ap.add_argument("--cache-steps", type=int, default=12, help="steps of the cache comparison (default 12)")
    ap.add_argument("--sequential-steps", type=int, default=2, help="steps of the sequential-offload run")
    ap.add_argument("--skip-sequential", action="store_true", help="leave sequential offload out")
    ap.add_argument("--no-compile", action="store_true", help="leave the compile runs out")
    ap.add_argument("--compile-estimate-s", type=float, default=90.0, help="compile time assumed for the budget")
    ap.add_argument("--text-layers", type=int, default=2, help="UMT5-XXL encoder layers to build (real: 24)")
    ap.add_argument("--a14b", action="store_true", help="also one A14B expert (builds and saves ~28 GB)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="skip runs that would end after this (s)")
    ap.add_argument("--out", help="folder for the videos (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the built model folders")
    args = ap.parse_args()
    args.steps = args.steps or (2 if args.smoke else 4)
    args.size = args.size or ("64x64" if args.smoke else "1280x704")
    args.frames = args.frames or (9 if args.smoke else 121)

    from daemon import logs

    logs.setup("WARNING")  # the worker's per-load INFO lines would break up the table
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or use --smoke for the CPU path", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="wan-gpu-bench-"))  # local disk; the folders are deleted at the end
    out = Path(args.out) if args.out else work / "videos"
    out.mkdir(parents=True, exist_ok=True)
    results = Path(os.environ["OUT"], "gpu_results.json") if os.environ.get("OUT") else Path("bench-gpu-results.json")
    bench = Bench(args, device, out, results)
    device_name = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    bench.meta.update(
        device=device_name,
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        smoke=args.smoke,
        versions={
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        job={
            "size": args.size,
            "frames": args.frames,
            "steps": args.steps,
            "guidance_scale": 5.0,
            "cache_steps": args.cache_steps,
        },
        args=vars(args),
    )
    print(
        f"wan-daemon GPU benchmark  {bench.meta['date']}  {device_name}  torch {torch.__version__}  "
        f"diffusers {diffusers.__version__}  transformers {transformers.__version__}",
        flush=True,
    )

    folder = work / "models" / "wan2.2-ti2v-5b-random"
    try:
        facts = build_model(folder, a14b=False, smoke=args.smoke, text_layers=args.text_layers, device=device)
    except Exception as exc:
        print(f"building the model failed: {type(exc).__name__}: {exc}", flush=True)
        bench.meta["build_error"] = str(exc)
        bench.save()
        return 1
    bench.meta["model"] = facts
    what = "TINY test twin of Wan2.2 TI2V-5B (--smoke)" if args.smoke else "Wan2.2 TI2V-5B architecture"
    print(
        f"model: {what}, random weights, transformer {count(facts['transformer_params'])} params, "
        f"{facts['disk_gb']:.2f} GB on disk; text encoder UMT5 with {facts['text_layers']} of 24 layers"
        + (f" (real: +{facts['text_missing_gib']:.1f} GiB resident and to load)" if not args.smoke else "")
    )
    print(
        f"job: {args.size} x {args.frames} frames, {args.steps} steps, CFG 5.0 (cache rows: {args.cache_steps} "
        f"steps); loads read the page cache (just written); budget {args.budget_s:.0f} s",
        flush=True,
    )
    bench.header()
    bench.add(
        "build",
        "build TI2V-5B (random weights)",
        total_s=facts["construct_s"] + facts["save_s"],
        note=f"construct {facts['construct_s']:.1f} s + save_pretrained {facts['save_s']:.1f} s",
    )
    try:
        run_sections(bench, folder, work / "models")
    except Exception as exc:  # a failure outside any single run (locating the folder, building the backend)
        bench.failed("setup", "daemon sections", exc)
    if args.a14b:
        run_a14b(bench, work)

    print(
        f"\n{bench.markdown()}\n\nelapsed {time.perf_counter() - bench.started:.0f} s; results: {results}", flush=True
    )
    bench.save()
    if not args.keep:
        shutil.rmtree(work / "models", ignore_errors=True)
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
