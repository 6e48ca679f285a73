"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import pytest
import torch


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
