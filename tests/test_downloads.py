"""daemon.hub (download, verify, cache) against a local fake hub (tests/hubserver.py) serving the tiny TI2V-5B
model folder as ``Wan-AI/Tiny-Test-Diffusers``, plus files a real repo has and the daemon must not fetch. No
internet.

How huggingface_hub 2.4 is pointed at the fake hub. It reads its settings from the environment *once, at
import* (``huggingface_hub.constants``), and this test session imported it long before (conftest sets
``HF_HUB_OFFLINE=1`` first). Setting the environment variables alone therefore does nothing in this process;
the ``hub`` fixture sets them (for subprocesses, which read them at their own import) *and* monkeypatches
the constants that are read at call time:

* ``constants.ENDPOINT`` -- the default endpoint of ``HfApi()`` (read when an HfApi is built) and of the
  agent-detection request huggingface_hub sends while building its User-Agent (``/api/agent-harnesses``);
* ``constants.HUGGINGFACE_CO_URL_TEMPLATE`` -- ``hf_hub_url`` builds ``/resolve/`` URLs from this template,
  formatted at import from HF_ENDPOINT; patching ENDPOINT alone leaves downloads aimed at huggingface.co;
* ``constants.HF_HUB_OFFLINE`` -- checked by the HTTP session's request hook (``HF_HUB_OFFLINE=0`` in the
  environment is not seen);
* Xet stays on, as users have it (``hf_xet`` is installed with huggingface_hub and ``HF_HUB_DISABLE_XET`` is
  unset): the fake hub serves no Xet metadata, so huggingface_hub takes its plain-HTTP path for these files,
  exactly as it does for a non-Xet file of a real repo with Xet on (``test_downloads_run_as_users_have_them``);
* ``constants.HF_HUB_CACHE`` -- the default cache of snapshot_download / scan_cache_dir (tmp_path);
* ``constants.HF_TOKEN_PATH`` and ``HF_TOKEN`` -- so that no real token is sent;
* ``constants.DOWNLOAD_CHUNK_SIZE`` -- 16 KiB instead of 10 MiB: huggingface_hub writes a download to disk
  in chunks of this size, and our files are ~200 KB, so partial files (progress, resume) only show with
  small chunks. With real weights (GBs) the 10 MiB chunks behave the same way.

Passing ``endpoint=`` to download()/verify() would also work for the hub calls, but the constants are what
a process configured through HF_ENDPOINT at start-up gets, so that is what these tests exercise.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
from hubserver import HubServer

from daemon.hub.cache import MANIFEST_NAME, list_cached, remove, snapshot_path
from daemon.hub.download import DownloadError, download
from daemon.hub.remote import filter_files
from daemon.hub.verify import verify, verify_local
from daemon.models import I2V_A14B, T2V_A14B, TI2V_5B, needed_patterns

REPO = "Wan-AI/Tiny-Test-Diffusers"
TRANSFORMER = "transformer/diffusion_pytorch_model.safetensors"
VAE = "vae/diffusion_pytorch_model.safetensors"
# Files a real repo carries that the pipeline does not load: never fetched.
UNWANTED = [
    "original_checkpoint.pth",
    "README.md",
    "assets/demo.png",
    "text_encoder/pytorch_model.bin",
    "wan_daemon_tiny.json",
]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def fake_repo(models_dir, tmp_path_factory) -> Path:
    src = models_dir / "tiny-ti2v-5b"
    if not (src / "model_index.json").is_file():
        pytest.fail(f"the session fixture did not build the tiny TI2V-5B model at {src}")
    repo = tmp_path_factory.mktemp("fake-hub") / "Tiny-Test-Diffusers"
    shutil.copytree(src, repo)
    (repo / "original_checkpoint.pth").write_bytes(bytes(range(256)) * 1200)
    (repo / "text_encoder" / "pytorch_model.bin").write_bytes(b"\x80\x02" + bytes(50_000))
    (repo / "assets").mkdir()
    (repo / "assets" / "demo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20_000))
    (repo / "README.md").write_text("# Tiny test model\n\n![demo](assets/demo.png)\n")
    return repo


@pytest.fixture
def hub(fake_repo, monkeypatch, tmp_path):
    from huggingface_hub import constants

    with HubServer({REPO: fake_repo}) as server:
        home = tmp_path / "hf-home"
        for key, value in {
            "HF_ENDPOINT": server.url,
            "HF_HUB_OFFLINE": "0",
            "HF_HOME": str(home),
            "HF_HUB_DISABLE_TELEMETRY": "1",
        }.items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        monkeypatch.delenv("HF_HUB_DISABLE_XET", raising=False)
        monkeypatch.delenv("HF_HUB_CACHE", raising=False)
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
        monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 16 * 1024)
        monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(home / ".agent_harnesses.json"), raising=False)
        yield server


def needed(server: HubServer) -> dict:
    """name -> FileEntry of the files the TI2V-5B pipeline needs, as the fake hub describes them."""
    files = server.files(REPO)
    names = filter_files(files, needed_patterns(TI2V_5B))
    return {n: files[n] for n in names}


def get(**kwargs) -> Path:
    return download(REPO, allow_patterns=needed_patterns(TI2V_5B), **kwargs)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# ---- which files --------------------------------------------------------------------------------------

REAL_REPO_FILES = [  # the layout of Wan-AI/Wan2.2-*-Diffusers, plus things a repo may also carry
    ".gitattributes",
    "README.md",
    "assets/logo.png",
    "examples/i2v_input.JPG",
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model-00001-of-00005.safetensors",
    "text_encoder/model.safetensors.index.json",
    "text_encoder/pytorch_model.bin",
    "tokenizer/special_tokens_map.json",
    "tokenizer/spiece.model",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
    "transformer/diffusion_pytorch_model.safetensors.index.json",
    "transformer_2/config.json",
    "transformer_2/diffusion_pytorch_model-00001-of-00003.safetensors",
    "transformer_2/diffusion_pytorch_model.safetensors.index.json",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.pth",
    "Wan2.2_VAE.pth",
    "models_t5_umt5-xxl-enc-bf16.pth",
    "high_noise_model/diffusion_pytorch_model.safetensors",
]


def test_the_hub_imports_neither_the_model_registry_nor_torch():
    """One direction: daemon.models looks snapshots up in the hub's cache; no hub module imports the registry
    (or torch) when it is imported."""
    code = (
        "import sys, daemon.hub.cache, daemon.hub.remote, daemon.hub.verify, daemon.hub.download, "
        "daemon.hub.commands; bad = {'daemon.models', 'torch', 'diffusers'} & set(sys.modules); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_needed_patterns_keep_only_what_the_pipeline_loads():
    five_b = set(filter_files(REAL_REPO_FILES, needed_patterns(TI2V_5B)))
    a14b = set(filter_files(REAL_REPO_FILES, needed_patterns(T2V_A14B)))
    common = {
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model-00001-of-00005.safetensors",
        "text_encoder/model.safetensors.index.json",
        "tokenizer/special_tokens_map.json",
        "tokenizer/spiece.model",
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    }
    assert five_b == common
    assert a14b == common | {
        "transformer_2/config.json",
        "transformer_2/diffusion_pytorch_model-00001-of-00003.safetensors",
        "transformer_2/diffusion_pytorch_model.safetensors.index.json",
    }
    assert needed_patterns(I2V_A14B) == needed_patterns(T2V_A14B)
    assert needed_patterns("tiny-ti2v-5b") == needed_patterns(TI2V_5B)  # registry names work too
    with pytest.raises(ValueError, match="unknown architecture"):
        needed_patterns("sdxl")


# ---- downloading --------------------------------------------------------------------------------------


def test_download_gives_a_folder_diffusers_loads(hub, tmp_path):
    path = get()  # cache_dir None: huggingface_hub's default cache (HF_HUB_CACHE), here under tmp_path
    commit = hub.commit(REPO)
    assert path == (tmp_path / "hf-home" / "hub" / "models--Wan-AI--Tiny-Test-Diffusers" / "snapshots" / commit)
    got = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert got == set(needed(hub)) | {MANIFEST_NAME}
    # The branch is recorded, so the snapshot is found again by name, without network.
    assert (path.parent.parent / "refs" / "main").read_text() == commit
    assert snapshot_path(REPO) == path

    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(path)
    assert type(pipe).__name__ == "WanPipeline"
    assert pipe.transformer.config.in_channels == 48 and pipe.vae.config.z_dim == 48
    assert pipe.transformer_2 is None
    assert pipe.config.expand_timesteps is True


def test_only_the_needed_files_are_fetched(hub, tmp_path):
    path = get(cache_dir=tmp_path / "cache")
    for name in UNWANTED:
        assert not (path / name).exists(), name
    asked = {r.path.split("/resolve/", 1)[1].split("/", 1)[1] for r in hub.requests if "/resolve/" in r.path}
    assert asked == set(needed(hub)), "the client asked the hub for files the pipeline does not need"
    blobs = path.parent.parent / "blobs"
    assert len(list(blobs.iterdir())) == len(needed(hub))


def test_progress_reaches_the_callback_without_a_tty(hub, tmp_path, monkeypatch):
    fake_stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", fake_stderr)
    assert not sys.stderr.isatty()
    hub.throttle_bps = 400_000  # ~0.5 s per weight file
    events: list[dict] = []
    get(cache_dir=tmp_path / "cache", progress=events.append, progress_interval=0.05)

    total = sum(e.size for e in needed(hub).values())
    seen = [e["downloaded_bytes"] for e in events]
    assert len(events) >= 3, events
    assert seen == sorted(seen), "downloaded_bytes went backwards"
    assert any(0 < b < total for b in seen), f"no intermediate progress: {seen}"
    assert {e["total_bytes"] for e in events} == {total}
    last = events[-1]
    assert last == {
        "repo": REPO,
        "downloaded_bytes": total,
        "total_bytes": total,
        "files_done": len(needed(hub)),
        "files_total": len(needed(hub)),
        "phase": "done",
    }
    assert [e["phase"] for e in events][-2:] == ["verifying", "done"]
    assert "Fetching" not in fake_stderr.getvalue(), "progress bars were written to a non-terminal stderr"


def test_connection_cut_midway_resumes_with_a_range_request(hub, tmp_path):
    """huggingface_hub retries a transfer cut off during a call with a Range request (same call)."""
    hub.cut_after_bytes[(REPO, VAE)] = 100_000
    path = get(cache_dir=tmp_path / "cache")
    ranges = [r.range for r in hub.body_requests(VAE) if r.range]
    assert ranges and ranges[0].startswith("bytes=") and int(ranges[0][6:].rstrip("-")) > 0, ranges
    assert verify(REPO, cache_dir=tmp_path / "cache").ok
    assert (path / VAE).read_bytes() == (hub.repos[REPO].folder / VAE).read_bytes()


_CHILD = """
import sys
from pathlib import Path
from huggingface_hub import constants
constants.DOWNLOAD_CHUNK_SIZE = 16 * 1024
from daemon.hub.download import download
from daemon.models import needed_patterns
download(sys.argv[1], cache_dir=Path(sys.argv[2]), allow_patterns=needed_patterns("wan2.2-ti2v-5b"))
print("child finished the download", flush=True)
"""


def test_downloads_run_as_users_have_them(hub):
    """These tests download with hf_xet installed and Xet on (huggingface_hub's default), not a configuration
    of their own: what they check is what users get."""
    import importlib.util

    from huggingface_hub import constants

    assert importlib.util.find_spec("hf_xet") is not None and not constants.HF_HUB_DISABLE_XET


def test_download_killed_midway_is_completed_by_the_next_call(hub, tmp_path):
    """A killed process leaves its partial file, which huggingface_hub never continues (its name is unique to
    that process): the next download() fetches the file again from its start, keeps what was finished, and
    removes the orphaned partial file."""
    cache = tmp_path / "cache"
    stalled = hub.stall(REPO, TRANSFORMER, 120_000)
    # The child reads HF_ENDPOINT and HF_HUB_OFFLINE=0 from the environment at import (Xet on, as users have it).
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, REPO, str(cache)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        if not stalled.wait(60):
            child.kill()
            pytest.fail("the child never reached the stalled transfer:\n" + child.communicate()[0].decode())
        sha = needed(hub)[TRANSFORMER].sha256
        blobs = cache / "models--Wan-AI--Tiny-Test-Diffusers" / "blobs"

        def partial():
            files = [p for p in blobs.glob(f"{sha}*.incomplete") if p.stat().st_size >= 64 * 1024]
            return files[0] if files else None

        wait_for(partial, 30, "the child's partial file")
    finally:
        child.kill()
        out = child.communicate()[0].decode()
    assert "child finished" not in out
    hub.release()
    assert partial() is not None, "the killed download left no partial file"
    finished = {p.name for p in blobs.iterdir() if "." not in p.name}

    done_before = [n for n, f in needed(hub).items() if f.etag in finished]
    counts = {n: len(hub.body_requests(n)) for n in needed(hub)}
    path = get(cache_dir=cache)
    again = hub.body_requests(TRANSFORMER)[counts[TRANSFORMER] :]
    assert again and not [r.range for r in again if r.range], "not fetched again from its start"
    assert all(len(hub.body_requests(n)) == counts[n] for n in done_before), "a finished file was fetched again"
    assert (path / TRANSFORMER).read_bytes() == (hub.repos[REPO].folder / TRANSFORMER).read_bytes()
    assert not list(blobs.glob("*.incomplete"))
    assert verify(REPO, cache_dir=cache).ok


def test_file_served_corrupted_is_caught_removed_and_fetched_again(hub, tmp_path):
    cache = tmp_path / "cache"
    hub.corrupt.add((REPO, TRANSFORMER))
    with pytest.raises(DownloadError) as err:
        get(cache_dir=cache)
    assert TRANSFORMER in str(err.value) and "sha256" in str(err.value)
    assert err.value.suggestions
    snap = cache / "models--Wan-AI--Tiny-Test-Diffusers" / "snapshots" / hub.commit(REPO)
    assert not (snap / TRANSFORMER).exists(), "the corrupted file was left in the cache"

    hub.corrupt.clear()
    vae_gets = len(hub.body_requests(VAE))
    path = get(cache_dir=cache)
    assert len(hub.body_requests(VAE)) == vae_gets, "files already good were downloaded again"
    report = verify(REPO, cache_dir=cache)
    assert report.ok and report.checked == len(needed(hub)) and report.source == "hub", report
    assert verify_local(path).ok


def test_verify_names_a_file_corrupted_on_disk(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "cache"
    path = get(cache_dir=cache)
    good = verify(REPO, cache_dir=cache)
    assert good.ok and good.checked == len(needed(hub)) and good.problems == []

    blob = (path / VAE).resolve()
    data = bytearray(blob.read_bytes())
    data[1000] ^= 0x01
    blob.write_bytes(bytes(data))
    config = (path / "transformer" / "config.json").resolve()
    config.write_text(config.read_text().replace("48", "47", 1))  # same size, different bytes

    report = verify(REPO, cache_dir=cache)
    assert not report.ok and report.source == "hub"
    assert any(p.startswith(VAE) and "sha256" in p for p in report.problems), report.problems
    assert any(p.startswith("transformer/config.json") and "git blob id" in p for p in report.problems)
    assert len(report.problems) == 2

    local = verify_local(path)
    assert not local.ok and {p.split(":")[0] for p in local.problems} == {VAE, "transformer/config.json"}

    # Offline, verify() falls back to the manifest written at download time.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = verify(REPO, cache_dir=cache)
    assert offline.source == "manifest" and not offline.ok and len(offline.problems) == 2

    (path / VAE).unlink()
    assert any(p == f"{VAE}: missing" for p in verify_local(path).problems)


def test_download_refuses_up_front_when_the_disk_is_too_small(hub, tmp_path):
    cache = tmp_path / "cache"
    total = sum(e.size for e in needed(hub).values())
    Usage = namedtuple("Usage", "total used free")
    asked: list[Path] = []

    def tiny_disk(path):
        asked.append(Path(path))
        return Usage(10**12, 10**12 - 1000, 1000)

    with pytest.raises(DownloadError) as err:
        get(cache_dir=cache, disk_usage=tiny_disk)
    msg = str(err.value)
    assert f"needs {total / 1e9:.1f} GB, only 0.0 GB free on {tmp_path}" in msg, msg
    assert any("HF_HOME" in s for s in err.value.suggestions)
    assert asked == [tmp_path], "free space must be measured on the nearest existing folder of the cache"
    assert not any("/resolve/" in r.path or r.path.startswith("/cdn/") for r in hub.requests)
    assert not cache.exists()

    # min_free_mb is added to what the download needs.
    just_enough = lambda path: Usage(10**12, 0, total + (1 << 20) // 2)  # noqa: E731
    with pytest.raises(DownloadError, match=r"\+1 MiB to keep free"):
        get(cache_dir=cache, disk_usage=just_enough, min_free_mb=1)
    assert get(cache_dir=cache, disk_usage=just_enough, min_free_mb=0).is_dir()


def test_list_cached_and_remove(hub, tmp_path):
    cache = tmp_path / "cache"
    assert list_cached(cache) == [] and remove(REPO, cache_dir=cache) == 0  # no cache yet
    path = get(cache_dir=cache)
    total = sum(e.size for e in needed(hub).values())

    [entry] = list_cached(cache)
    assert entry["repo_id"] == REPO and entry["revisions"] == [hub.commit(REPO)]
    assert entry["refs"] == {"main": hub.commit(REPO)} and entry["snapshot"] == path and entry["manifest"]
    assert entry["size_on_disk"] >= total and entry["path"] == path.parent.parent
    json.dumps(entry, default=str)  # printable by the CLI

    freed = remove(REPO, cache_dir=cache)
    assert freed >= total
    assert not path.parent.parent.exists()
    assert list_cached(cache) == []
    assert remove(REPO, cache_dir=cache) == 0


def test_gated_repo_needs_a_token(hub, tmp_path):
    hub.gated[REPO] = "hf_test_token"
    with pytest.raises(DownloadError) as err:
        get(cache_dir=tmp_path / "cache")
    assert "gated" in str(err.value)
    assert any("HF_TOKEN" in s for s in err.value.suggestions)
    assert get(cache_dir=tmp_path / "cache", token="hf_test_token").is_dir()
    assert verify(REPO, cache_dir=tmp_path / "cache", token="hf_test_token").ok


def test_offline_mode_and_unknown_repo_are_explained(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    with pytest.raises(DownloadError) as err:
        download("Wan-AI/No-Such-Repo", cache_dir=tmp_path / "cache")
    assert "not found" in str(err.value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DownloadError) as err:
        get(cache_dir=tmp_path / "cache")
    assert "HF_HUB_OFFLINE" in str(err.value)
    assert not any(r.path.startswith("/api/models/Wan-AI/Tiny") for r in hub.requests)


# ---- through the CLI and the daemon ------------------------------------------------------------------


def test_models_commands_download_verify_list_remove(hub, tmp_path, capsys):
    from daemon.cli import main

    args = ["--inbox", str(tmp_path / "inbox")]
    assert main(["models", "download", REPO, *args]) == 0
    assert "downloaded" in capsys.readouterr().out
    assert main(["models", "verify", REPO, *args]) == 0
    out = capsys.readouterr().out
    n = len(hub.files(REPO))  # not a registry name: every file of the repo
    assert f"ok: {REPO}: {n} files in " in out and "checked against the hub's metadata for commit" in out, out
    hashed = re.search(r"(\d+) hashed in full \(sha256\), (\d+) by git blob id", out)
    assert hashed and int(hashed[1]) > 0 and int(hashed[1]) + int(hashed[2]) == n, out
    assert main(["models", "list", *args]) == 0
    assert REPO in capsys.readouterr().out
    assert main(["models", "list", "--json", *args]) == 0
    listed = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert listed[REPO]["kind"] == "hub_cache" and listed[REPO]["size_bytes"] > 0 and listed[REPO]["present"]
    assert main(["models", "remove", REPO, *args]) == 0
    assert "removed" in capsys.readouterr().out
    assert main(["models", "verify", "tiny-ti2v-5b", *args]) == 2  # tiny models are built, not downloaded


def test_a_job_waits_for_its_model_while_it_downloads_then_runs(hub, harness_factory, monkeypatch):
    """auto_download: the job is visible as waiting_for_model, other jobs keep running, then it runs."""
    from dataclasses import replace

    from daemon import models

    info = replace(
        models.REGISTRY["wan2.2-ti2v-5b"], name="hub-5b", repo_id=REPO, width=64, height=64, frames=9, steps=2
    )
    monkeypatch.setitem(models.REGISTRY, "hub-5b", info)
    hub.throttle_bps = 2_000_000  # slow enough to see the waiting state
    h = harness_factory(worker={"allow_cpu_for_real_models": True}).start()
    h.drop("wants.yaml", "model: hub-5b\nprompt: after the download\n")
    h.drop("other.yaml", "model: tiny-ti2v-5b\nprompt: meanwhile\nsteps: 2\n")
    wait_for_state = __import__("conftest").wait_for
    wait_for_state(
        lambda: json.loads(h.settings.health_path.read_text()).get("waiting_for_model") == 1,
        30,
        what="the job to wait for its model",
    )
    assert h.sidecar("other")["status"] == "done"
    side = h.sidecar("wants", timeout=120)
    assert side["model_used"]["name"] == "hub-5b" and side["model_used"]["source"] == "hub-cache"
    assert side["model_used"]["revision"]


def test_a_failed_download_fails_only_the_jobs_that_need_it(hub, harness_factory, monkeypatch):
    from dataclasses import replace

    from daemon import models

    info = replace(models.REGISTRY["wan2.2-ti2v-5b"], name="gone-5b", repo_id="Wan-AI/Does-Not-Exist")
    monkeypatch.setitem(models.REGISTRY, "gone-5b", info)
    h = harness_factory(worker={"allow_cpu_for_real_models": True}).start()
    h.drop("needs.yaml", "model: gone-5b\nprompt: never\n")
    h.drop("fine.yaml", "model: tiny-ti2v-5b\nprompt: fine\nsteps: 2\n")
    record = h.failure("needs", timeout=60)
    assert record["error_category"] == "model_download" and "Does-Not-Exist" in record["message"]
    assert record["recovery_suggestions"]
    assert h.sidecar("fine")["status"] == "done"


@pytest.mark.parametrize("gpus", [[24576], []], ids=["24-GiB-GPU", "no-GPU"])
def test_a_job_no_worker_could_run_fails_at_once_and_nothing_is_downloaded(hub, harness_factory, monkeypatch, gpus):
    """A registry model is fetched only for a job some configured worker could run in some offload mode."""
    from dataclasses import replace

    from daemon import models
    from daemon.ops.inventory import GpuInfo, StaticInventory

    info = replace(models.REGISTRY["wan2.2-ti2v-5b"], name="hub-5b", repo_id=REPO)
    monkeypatch.setitem(models.REGISTRY, "hub-5b", info)
    inventory = StaticInventory([GpuInfo(i, "Fake", t, 0, t) for i, t in enumerate(gpus)])
    h = harness_factory(backend="daemon.testing:CueBackend", inventory=inventory).start()
    h.drop("huge.yaml", "model: hub-5b\nprompt: too big\nsize: 2048x2048\nframes: 481\n")
    record = h.failure("huge", timeout=30)
    assert record["error_category"] == "insufficient_vram" and record["attempts"] == 0
    assert "MiB" in record["message"] and "not downloaded" in record["message"]
    assert ("24576 MiB" if gpus else "allow_cpu_for_real_models") in record["message"]
    assert hub.body_requests() == [] and not [r for r in hub.requests if "/api/models/" in r.path]
