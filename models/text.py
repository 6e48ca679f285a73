"""Text encoders: prompts in, per-token embeddings plus a padding mask out.

Two encoders share one output type, `TextEmbeddings`, so the diffusion transformer's cross-attention
never cares which one produced its keys:

- `ByteTextEncoder`: a small byte-level transformer trained jointly with the diffusion model. It needs
  no vocabulary file and no download, which makes it the default for laptop-sized runs and tests.
- `T5TextEncoder`: a frozen Hugging Face T5 encoder read from a local directory only. Nothing downloads
  at run time: a missing or incomplete directory fails with a message naming the files expected.

Dimensions: B prompts, L tokens (padded to the longest prompt in the batch), D encoder width.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import torch
from torch import Tensor, nn

from configs.schema import TextConfig, TextEncoderKind
from models.weights import read_weights, save_weights

# ----------------------------------------------------------------------------------------------------
# Output type and helpers
# ----------------------------------------------------------------------------------------------------


@dataclass
class TextEmbeddings:
    """Encoded prompts; every row has at least one real token, so cross-attention never sees no keys."""

    tokens: Tensor  # (B, L, D) float
    mask: Tensor  # (B, L) bool, True = real token

    def to(self, device: torch.device | str) -> TextEmbeddings:
        """Move both tensors to `device` (e.g. after encoding on one device for a model on another)."""
        return TextEmbeddings(tokens=self.tokens.to(device), mask=self.mask.to(device))


def pooled(emb: TextEmbeddings) -> Tensor:
    """Masked mean over real tokens, (..., L, D) → (..., D): a global prompt vector for adaLN conditioning."""
    weights = emb.mask.to(emb.tokens.dtype).unsqueeze(-1)  # (..., L, 1)
    total = (emb.tokens * weights).sum(dim=-2)  # (..., D)
    return total / weights.sum(dim=-2).clamp(min=1.0)


def _check_prompts(prompts: list[str]) -> None:
    """Reject a bare string, which would otherwise be encoded silently as one prompt per character."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts must be a list of str, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts must contain at least one prompt")


# ----------------------------------------------------------------------------------------------------
# Byte-level encoder (trained jointly, no downloads)
# ----------------------------------------------------------------------------------------------------

PAD_ID = 0
BOS_ID = 257
BYTE_VOCAB = 258  # 0 = padding, 1..256 = byte + 1, 257 = BOS
TEXT_CONFIG_NAME = "text_config.yaml"
"""The byte encoder's config file in a `save_pretrained` folder (beside a DiT's `config.yaml`)."""
TEXT_WEIGHTS_NAME = "text.safetensors"
"""The byte encoder's default weights file in a `save_pretrained` folder."""


def _truncate_utf8(data: bytes, budget: int) -> bytes:
    """Cut `data` to at most `budget` bytes without splitting a multi-byte UTF-8 character."""
    if len(data) <= budget:
        return data
    cut = budget
    while cut > 0 and (data[cut] & 0xC0) == 0x80:  # data[cut] is a continuation byte: back off
        cut -= 1
    return data[:cut]


class ByteTextEncoder(nn.Module):
    """Small byte-level transformer encoder over UTF-8 bytes with a BOS token.

    Learned token and position embeddings, a pre-norm GELU `nn.TransformerEncoder` masked by padding,
    and a final LayerNorm. Padded output positions are zeroed so they carry nothing downstream.
    """

    def __init__(self, dim: int, depth: int, heads: int, max_length: int) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"text dim ({dim}) must be divisible by heads ({heads})")
        if max_length < 1:
            raise ValueError(f"text max_length must be >= 1 (room for the BOS token), got {max_length}")
        self.dim = dim
        self.max_length = max_length
        self.config = TextConfig(encoder="byte", width=dim, depth=depth, heads=heads, max_length=max_length)
        self.token_embed = nn.Embedding(BYTE_VOCAB, dim, padding_idx=PAD_ID)
        self.pos_embed = nn.Embedding(max_length, dim)
        layer = nn.TransformerEncoderLayer(
            d_model=dim,
            nhead=heads,
            dim_feedforward=4 * dim,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        # Unit-scale embeddings (as T5's). With GPT-style 0.02 the jointly trained encoder collapsed: after
        # 200 steps of the demo's base training every token of every prompt came out as the same vector
        # (cosine 0.999), and the diffusion model could not learn anything from the text.
        nn.init.normal_(self.token_embed.weight, std=1.0)
        nn.init.normal_(self.pos_embed.weight, std=1.0)
        with torch.no_grad():
            self.token_embed.weight[PAD_ID].zero_()

    @classmethod
    def from_config(cls, cfg: TextConfig) -> ByteTextEncoder:
        """A freshly initialised encoder of the shape `cfg` names (text.width, depth, heads, max_length)."""
        return cls(dim=cfg.width, depth=cfg.depth, heads=cfg.heads, max_length=cfg.max_length)

    def save_pretrained(self, directory: str | Path, weights_name: str = TEXT_WEIGHTS_NAME) -> Path:
        """Write `text_config.yaml` and safetensors weights into `directory`; returns the weights path."""
        return save_weights(directory, self.config, self.state_dict(), weights_name, TEXT_CONFIG_NAME)

    @classmethod
    def from_pretrained(cls, directory: str | Path, weights_name: str = TEXT_WEIGHTS_NAME) -> ByteTextEncoder:
        """Build from `directory/text_config.yaml` and load its safetensors weights (never a pickle)."""
        config, state = read_weights(directory, TextConfig, weights_name, TEXT_CONFIG_NAME)
        encoder = cls.from_config(config)
        encoder.load_state_dict(state)
        return encoder

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """UTF-8 bytes + 1 after a BOS, truncated on character boundaries, right-padded: (B, L) ids, mask."""
        _check_prompts(prompts)
        rows = [
            [BOS_ID] + [b + 1 for b in _truncate_utf8(p.encode("utf-8"), self.max_length - 1)]
            for p in prompts
        ]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long)  # (B, L)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return ids, ids != PAD_ID

    def forward(self, prompts: list[str]) -> TextEmbeddings:
        """Encode prompts on the module's device; gradients flow for joint training."""
        device = self.token_embed.weight.device
        ids, mask = self.tokenize(prompts)
        ids, mask = ids.to(device), mask.to(device)  # (B, L)
        positions = torch.arange(ids.shape[1], device=device)  # (L,)
        x = self.token_embed(ids) + self.pos_embed(positions)[None]  # (B, L, D)
        x = self.encoder(x, src_key_padding_mask=~mask)  # (B, L, D); True in the key mask = ignore
        x = self.norm(x) * mask.unsqueeze(-1).to(x.dtype)  # (B, L, D), padded positions zeroed
        return TextEmbeddings(tokens=x, mask=mask)


# ----------------------------------------------------------------------------------------------------
# Frozen T5 encoder (local directory only)
# ----------------------------------------------------------------------------------------------------

T5_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
T5_TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")


def check_t5_dir(path: str | Path) -> Path:
    """Verify a local T5 directory has config, safetensors weights and tokenizer files.

    Runs before transformers sees the path, so a bad path can never turn into a hub download.
    """
    root = Path(path).expanduser()
    expected = (
        f"config.json, one of {' / '.join(T5_WEIGHT_FILES)}, and tokenizer files "
        f"(one of {' / '.join(T5_TOKENIZER_FILES)})"
    )
    if not root.is_dir():
        raise FileNotFoundError(
            f"T5 text encoder directory not found: {root} (expected a folder with {expected})"
        )
    missing = []
    if not (root / "config.json").is_file():
        missing.append("config.json")
    if not any((root / f).is_file() for f in T5_WEIGHT_FILES):
        missing.append(" or ".join(T5_WEIGHT_FILES))
    if not any((root / f).is_file() for f in T5_TOKENIZER_FILES):
        missing.append("tokenizer files (" + " or ".join(T5_TOKENIZER_FILES) + ")")
    if missing:
        raise FileNotFoundError(
            f"T5 text encoder directory {root} is incomplete: missing {', '.join(missing)} "
            f"(expected {expected}; save them with save_pretrained)"
        )
    return root


class T5TextEncoder(nn.Module):
    """Frozen Hugging Face T5 encoder loaded from a local directory; always in eval mode, never trained.

    Note: the T5 weights are a registered submodule (so `.to(device)` moves them); a parent that saves
    its whole state_dict will include them.
    """

    def __init__(self, path: str | Path, max_length: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        root = check_t5_dir(path)
        import transformers  # deferred: only T5 users pay for the import

        self.max_length = max_length
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(root, local_files_only=True)
        major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
        dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56
        self.model = transformers.T5EncoderModel.from_pretrained(
            root, local_files_only=True, use_safetensors=True, **{dtype_kw: dtype}
        )
        self.model.requires_grad_(False)
        self.dim: int = self.model.config.d_model
        self.train(False)

    @classmethod
    def from_config(cls, cfg: TextConfig) -> T5TextEncoder:
        """The frozen T5 of `text.t5_path`, cutting prompts at `text.max_length` tokens."""
        if not cfg.t5_path.strip():
            raise ValueError(
                "text.encoder is 't5' but text.t5_path is empty: set text.t5_path to a local T5 "
                "directory (config.json, model.safetensors, tokenizer files)"
            )
        return cls(cfg.t5_path, max_length=cfg.max_length)

    def train(self, mode: bool = True) -> T5TextEncoder:
        """Ignore `mode`: the encoder is frozen, so it stays in eval mode (no dropout) under any parent."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> TextEmbeddings:
        """Tokenize (pad to longest, truncate to max_length) and encode; float32 tokens, model device."""
        _check_prompts(prompts)
        device = next(self.model.parameters()).device
        batch = self.tokenizer(
            prompts,
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        ids = batch["input_ids"].to(device)  # (B, L)
        mask = batch["attention_mask"].to(device).bool()  # (B, L)
        hidden = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (B, L, D)
        return TextEmbeddings(tokens=hidden.float(), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Factory
# ----------------------------------------------------------------------------------------------------


def build_text_encoder(cfg: TextConfig) -> nn.Module:
    """The text encoder `cfg` names: a fresh byte encoder (text.encoder=byte) or the frozen local T5."""
    if cfg.encoder == "byte":
        return ByteTextEncoder.from_config(cfg)
    if cfg.encoder == "t5":
        return T5TextEncoder.from_config(cfg)
    expected = ", ".join(get_args(TextEncoderKind))
    raise ValueError(f"unknown text encoder {cfg.encoder!r}; expected one of {expected}")
