"""Fixtures shared by unit and integration tests (the shared test media, a tiny local T5) and the
`integration` marker of everything under tests/integration/."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from stages.media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from tests import ROOT

MEDIA = Path(os.environ.get("TESSERA_MEDIA", ROOT.parent / "shared" / "media"))
"""The shared test media (real clips and photos, see its MANIFEST.md): $TESSERA_MEDIA, else
../shared/media beside the repository."""
NO_MEDIA = f"shared test media not found at {MEDIA} (set TESSERA_MEDIA to the media folder)"


@pytest.fixture
def media() -> Callable[..., Path]:
    """`media()` is the shared media folder and `media(name)` one file in it; either skips the test,
    naming what is missing, where the folder or the file is absent."""

    def lookup(name: str = "") -> Path:
        if not MEDIA.is_dir():
            pytest.skip(NO_MEDIA)
        path = MEDIA / name
        if not path.exists():
            pytest.skip(f"{name} missing from {MEDIA}")
        return path

    return lookup


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/integration/ is marked `integration` (it starts processes, clusters or
    trainings); the fast tier is `-m "not slow and not integration"`."""
    integration = ROOT / "tests" / "integration"
    for item in items:
        if integration in Path(item.fspath).parents:
            item.add_marker(pytest.mark.integration)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test taking `media_name` runs once per video and image of the shared media (skipped with the
    reason when the folder is absent)."""
    if "media_name" not in metafunc.fixturenames:
        return
    if not MEDIA.is_dir():
        metafunc.parametrize("media_name", [pytest.param(None, marks=pytest.mark.skip(reason=NO_MEDIA))])
        return
    kinds = VIDEO_EXTENSIONS | IMAGE_EXTENSIONS
    names = sorted(p.name for p in MEDIA.iterdir() if p.suffix.lower().lstrip(".") in kinds)
    metafunc.parametrize("media_name", names)


@pytest.fixture
def tiny_t5_dir(tmp_path, monkeypatch):
    """A tiny random T5 encoder + ByT5 tokenizer saved locally: (path, model, tokenizer)."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    tokenizer = transformers.ByT5Tokenizer()
    config = transformers.T5Config(
        d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=len(tokenizer)
    )
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(config).eval()
    path = tmp_path / "t5"
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path, model, tokenizer


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted at a fresh folder, unmounted afterwards (`mount -o remount,size=…` resizes
    it); skips where this process cannot mount one (not root, or in a container without the right)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
