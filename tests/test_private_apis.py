"""No private API of a library outside one guarded function each, and each guarded one still where we reach for
it: when a library moves it, these tests fail loudly instead of a feature going quietly missing."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "daemon"
LIBRARIES = ("diffusers", "transformers", "huggingface_hub", "imageio_ffmpeg", "imageio", "torch", "peft", "accelerate")
# (module, private import) -> the one function allowed to make it.
GUARDED = {
    ("daemon/worker/main.py", "imageio_ffmpeg._io.get_first_available_h264_encoder"): "h264_encoder_probe",
}
# Internal names without a leading underscore (not exported by the library, not in its documentation).
INTERNAL = {"huggingface_hub.file_download.http_get", "huggingface_hub.file_download.xet_get"}


def private_imports() -> list[tuple[str, str, str | None]]:
    """(file, dotted name, enclosing function or None) of every import of a library's private name."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        parents: dict[ast.AST, ast.AST] = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] in LIBRARIES and (any(p.startswith("_") for p in parts[1:]) or name in INTERNAL):
                    up = parents.get(node)
                    while up is not None and not isinstance(up, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        up = parents.get(up)
                    found.append((str(path.relative_to(PACKAGE.parent)), name, up.name if up is not None else None))
    return found


def test_private_library_names_are_imported_only_inside_their_guarded_function():
    for file, name, function in private_imports():
        allowed = GUARDED.get((file, name))
        assert allowed is not None, f"{file} imports the private {name}: use a public API, or guard it (see GUARDED)"
        assert function is not None and allowed in ("*", function), f"{file}: {name} outside {allowed}()"


def test_the_hub_download_path_uses_no_private_huggingface_hub_api():
    assert not [n for f, n, _ in private_imports() if f.startswith("daemon/hub/")]


def test_the_h264_encoder_probe_is_where_imageio_ffmpeg_keeps_it():
    from daemon.worker.main import h264_encoder_probe

    assert callable(h264_encoder_probe())


def test_attention_backends_are_checked_through_diffusers_public_api():
    pytest.importorskip("diffusers")
    import importlib.util

    from daemon.worker.speed import attention_available

    assert attention_available("native") is None
    if importlib.util.find_spec("flash_attn") is None:
        problem = attention_available("flash")
        assert problem and "flash" in problem.lower()
