"""Text encoders: byte tokenizer rules, padding invariance, gradients, local-only T5 equivalence."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from configs import TextConfig
from models.text import (
    BOS_ID,
    ByteTextEncoder,
    T5TextEncoder,
    TextEmbeddings,
    build_text_encoder,
    pooled,
)


def _byte_encoder(max_length: int = 64, seed: int = 0) -> ByteTextEncoder:
    torch.manual_seed(seed)
    return ByteTextEncoder(dim=32, depth=2, heads=4, max_length=max_length)


# ----------------------------------------------------------------------------------------------------
# Byte tokenizer
# ----------------------------------------------------------------------------------------------------


def test_byte_ids_are_bytes_plus_one_after_bos() -> None:
    ids, mask = _byte_encoder().tokenize(["a cat!"])
    assert ids[0].tolist() == [BOS_ID] + [b + 1 for b in b"a cat!"]
    assert mask.all()


def test_byte_padding_mask_for_mixed_lengths() -> None:
    ids, mask = _byte_encoder().tokenize(["ab", "abcdef", ""])
    assert ids.shape == (3, 7)
    assert mask.sum(dim=1).tolist() == [3, 7, 1]
    assert mask[0].tolist() == [True] * 3 + [False] * 4
    assert (ids[~mask] == 0).all()
    assert (ids[mask] != 0).all()


def test_empty_prompt_gives_exactly_one_real_token() -> None:
    enc = _byte_encoder()
    ids, mask = enc.tokenize([""])
    assert ids.tolist() == [[BOS_ID]]
    assert mask.tolist() == [[True]]
    out = enc([""])
    assert out.tokens.shape == (1, 1, 32)
    assert torch.isfinite(out.tokens).all()


@pytest.mark.parametrize("text", ["é" * 20, "😀" * 10, "aé😀" * 6])
@pytest.mark.parametrize("max_length", [2, 5, 8, 13])
def test_truncation_respects_max_length_and_utf8_boundaries(text: str, max_length: int) -> None:
    ids, mask = _byte_encoder(max_length=max_length).tokenize([text])
    assert ids.shape[1] <= max_length
    kept = bytes(int(i) - 1 for i in ids[0, 1:][mask[0, 1:]])
    decoded = kept.decode("utf-8")  # raises if a multi-byte character was split
    assert text.startswith(decoded)
    # The longest character is 4 bytes: never drop more than needed to land on a boundary.
    assert len(kept) > max_length - 1 - 4


def test_truncation_keeps_whole_string_when_it_fits() -> None:
    ids, _ = _byte_encoder(max_length=5).tokenize(["éé"])  # BOS + 4 bytes = 5
    assert bytes(int(i) - 1 for i in ids[0, 1:]).decode("utf-8") == "éé"


def test_bare_string_is_rejected() -> None:
    with pytest.raises(TypeError, match="list of str"):
        _byte_encoder()("a cat")


# ----------------------------------------------------------------------------------------------------
# Byte encoder
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train_mode", [True, False])
def test_padding_does_not_change_real_token_outputs(train_mode: bool) -> None:
    enc = _byte_encoder().train(train_mode)
    with torch.no_grad():
        alone = enc(["a red fox"])
        batched = enc(["a red fox", "a much longer prompt about a red fox jumping over things"])
    n = int(alone.mask.sum())
    assert batched.mask[0].sum() == n and batched.mask.shape[1] > n
    torch.testing.assert_close(batched.tokens[0, :n], alone.tokens[0], atol=1e-5, rtol=1e-5)
    assert (batched.tokens[0, n:] == 0).all()


def test_gradients_reach_every_parameter() -> None:
    enc = _byte_encoder(max_length=16)
    out = enc(["hello", "a much longer prompt"])
    (out.tokens.pow(2).sum() + pooled(out).sum()).backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_same_seed_same_output() -> None:
    prompts = ["a cat", "ünïcødé 😀"]
    a, b = _byte_encoder(seed=3)(prompts), _byte_encoder(seed=3)(prompts)
    torch.testing.assert_close(a.tokens, b.tokens, atol=0, rtol=0)
    c = _byte_encoder(seed=4)(prompts)
    assert not torch.allclose(a.tokens, c.tokens)


def test_pooled_is_masked_mean() -> None:
    tokens = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[True, True, False]])
    torch.testing.assert_close(pooled(TextEmbeddings(tokens, mask)), torch.tensor([[2.0, 3.0]]))


def test_text_embeddings_to_moves_both_tensors() -> None:
    emb = TextEmbeddings(torch.zeros(1, 2, 3, dtype=torch.float64), torch.ones(1, 2, dtype=torch.bool))
    moved = emb.to("meta")
    assert moved.tokens.device.type == "meta" and moved.mask.device.type == "meta"
    assert moved.mask.dtype == torch.bool


# ----------------------------------------------------------------------------------------------------
# T5 (tiny random model saved locally; offline)
# ----------------------------------------------------------------------------------------------------


def test_t5_matches_transformers_directly(tiny_t5_dir) -> None:
    path, ref_model, tokenizer = tiny_t5_dir
    enc = T5TextEncoder(path, max_length=16)
    assert enc.dim == 32
    prompts = ["a cat", "", "a considerably longer prompt that gets truncated"]
    out = enc(prompts)
    batch = tokenizer(prompts, padding="longest", truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        ref = ref_model(**batch).last_hidden_state
    assert out.tokens.dtype == torch.float32
    assert out.mask.dtype == torch.bool
    assert out.tokens.shape == (3, 16, 32)
    torch.testing.assert_close(out.tokens, ref, atol=1e-6, rtol=1e-5)
    assert out.mask.tolist() == batch["attention_mask"].bool().tolist()
    assert out.mask.any(dim=1).all()  # even the empty prompt has a real (EOS) token


def test_t5_frozen_and_stays_in_eval(tiny_t5_dir) -> None:
    path, _, _ = tiny_t5_dir
    enc = T5TextEncoder(path, max_length=8)
    parent = nn.ModuleDict({"text": enc, "head": nn.Linear(2, 2)})
    parent.train()
    assert parent["head"].training
    assert not enc.training
    assert not any(m.training for m in enc.modules())
    assert all(not p.requires_grad for p in enc.parameters())
    out = enc(["x"])
    assert not out.tokens.requires_grad


def test_t5_missing_directory(tmp_path) -> None:
    missing = tmp_path / "no_such_t5"
    with pytest.raises(FileNotFoundError, match="no_such_t5") as info:
        T5TextEncoder(missing, max_length=8)
    assert "config.json" in str(info.value) and "model.safetensors" in str(info.value)


def test_t5_incomplete_directory_fails_before_transformers(tmp_path, monkeypatch) -> None:
    (tmp_path / "config.json").write_text("{}")
    import transformers

    def boom(*args, **kwargs):
        raise AssertionError("transformers must not be consulted for an incomplete directory")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", boom)
    monkeypatch.setattr(transformers.T5EncoderModel, "from_pretrained", boom)
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors") as info:
        T5TextEncoder(tmp_path, max_length=8)
    assert str(tmp_path) in str(info.value) and "tokenizer" in str(info.value)


# ----------------------------------------------------------------------------------------------------
# Factory
# ----------------------------------------------------------------------------------------------------


def test_factory_builds_byte_encoder() -> None:
    enc = build_text_encoder(TextConfig(encoder="byte", width=16, depth=1, heads=2, max_length=8))
    assert isinstance(enc, ByteTextEncoder) and enc.dim == 16


def test_factory_builds_t5_encoder(tiny_t5_dir) -> None:
    path, _, _ = tiny_t5_dir
    enc = build_text_encoder(TextConfig(encoder="t5", t5_path=str(path), max_length=8))
    assert isinstance(enc, T5TextEncoder) and enc.dim == 32


def test_factory_unknown_encoder() -> None:
    with pytest.raises(ValueError, match=r"'clip'.*byte.*t5"):
        build_text_encoder(TextConfig(encoder="clip"))


def test_factory_t5_needs_path() -> None:
    with pytest.raises(ValueError, match=r"text\.t5_path"):
        build_text_encoder(TextConfig(encoder="t5", max_length=8))


def test_byte_encoder_save_and_from_pretrained_round_trip(tmp_path) -> None:
    enc = _byte_encoder(max_length=12, seed=3)
    path = enc.save_pretrained(tmp_path / "text", "ema_text.safetensors")
    assert path == tmp_path / "text" / "ema_text.safetensors"
    loaded = ByteTextEncoder.from_pretrained(tmp_path / "text", "ema_text.safetensors")
    assert loaded.config == enc.config and loaded.max_length == 12
    prompts = ["a red circle", "über"]
    torch.testing.assert_close(loaded(prompts).tokens, enc(prompts).tokens, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors"):
        ByteTextEncoder.from_pretrained(tmp_path / "text", "model.safetensors")


def test_byte_encoder_rejects_bad_heads() -> None:
    with pytest.raises(ValueError, match="divisible"):
        ByteTextEncoder(dim=30, depth=1, heads=4, max_length=8)
