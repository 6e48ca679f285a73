"""Upscaling a user's clip through a cascade's super-resolution stages, and the render building blocks:
per-item random streams in `generate`, prompt files, slugs, prompt-length checks, Ray GPU shares."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from configs import CascadeStageConfig, DiffusionConfig, ModelConfig, RenderConfig, load_cascade, load_config
from models.dit import VideoDiT
from models.text import ByteTextEncoder
from pipeline.ray_render import replica_resources
from stages.media import write_mp4
from stages.render import read_prompts_file, upscale
from stages.render.output import load_input_video, load_video_tensor, read_json, slugify
from stages.render.stage import StageSpec, check_prompt_lengths
from stages.sampling import generate, item_generator
from tests.render_fixtures import VIDEO_STAGES, build_cascade


@pytest.fixture(scope="module")
def video_cascade(tmp_path_factory) -> Path:
    return build_cascade(tmp_path_factory.mktemp("cascade"), VIDEO_STAGES)


def synthetic_clip(path: Path, frames: int = 16, fps: float = 4.0, size: tuple[int, int] = (24, 40)) -> Path:
    """A moving gradient (T, H, W, 3), written as H.264."""
    h, w = size
    t = np.arange(frames)[:, None, None]
    y, x = np.mgrid[0:h, 0:w]
    red = (x[None] * 6 + t * 10) % 256
    video = np.stack([red, np.broadcast_to(y[None] * 10, red.shape), np.full_like(red, 128)], axis=-1)
    write_mp4(video.astype(np.uint8), path, fps)
    return path


def test_upscale_from_tsr_runs_the_remaining_stages(video_cascade, tmp_path):
    clip = synthetic_clip(tmp_path / "my clip.mp4")
    out = tmp_path / "out"
    summary = upscale(load_cascade(video_cascade), clip, "tsr", RenderConfig(out_dir=str(out)))
    job = out / "0000-my-clip"
    assert summary.prompts[0]["dir"] == job.name
    assert sorted(p.name for p in (job / "stages").glob("*.safetensors")) == [
        "01-tsr.safetensors",
        "02-ssr.safetensors",
        "input.safetensors",  # the prepared clip, which the tsr replica reads
    ]
    prepared = load_input_video(clip, 4, 16, 16, 4.0)  # the base output shape
    assert torch.equal(load_video_tensor(job / "stages" / "input.safetensors"), prepared)
    assert tuple(load_video_tensor(job / "stages" / "02-ssr.safetensors").shape) == (3, 8, 32, 32)
    with av.open(str(job / "video.mp4")) as container:
        stream = container.streams.video[0]
        assert sum(1 for _ in container.decode(stream)) == 8 and stream.average_rate == Fraction(8)
    sidecar = read_json(job / "video.json")
    assert sidecar["prompt"] == "" and sidecar["input"]["from_stage"] == "tsr"
    assert [s["guidance"]["scale"] for s in sidecar["stages"]] == [1.0, 1.0]  # empty prompt: no guidance
    assert (job / "sheet.png").is_file()


def test_upscale_input_shape_and_errors(video_cascade, tmp_path):
    clip = synthetic_clip(tmp_path / "clip.mp4")
    video = load_input_video(clip, 8, 16, 16, 8.0)  # the tsr output: 8 frames at 8 fps (1 s of a 4 s clip)
    assert video.shape == (3, 8, 16, 16) and video.dtype == torch.float32
    assert float(video.min()) >= -1.0 and float(video.max()) <= 1.0
    assert torch.equal(video[:, 0], video[:, 1])  # a 4 fps clip sampled at 8 fps repeats each frame
    cascade = load_cascade(video_cascade)
    settings = RenderConfig(out_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"'base' is the base stage; .*: tsr, ssr"):
        upscale(cascade, clip, "base", settings)
    with pytest.raises(ValueError, match=r"'nope' is not a stage of the cascade; .*: tsr, ssr"):
        upscale(cascade, clip, "nope", settings)
    short = synthetic_clip(tmp_path / "short.mp4", frames=2)
    with pytest.raises(ValueError, match=r"gives 2 frame\(s\) at 4 fps .* input is 4 frames"):
        upscale(cascade, short, "tsr", settings)
    with pytest.raises(FileNotFoundError, match=r"missing\.mp4 does not exist"):
        upscale(cascade, tmp_path / "missing.mp4", "tsr", settings)
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match=r"bad\.mp4: cannot decode"):
        upscale(cascade, tmp_path / "bad.mp4", "tsr", settings)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------


def test_generate_item_keys_default_is_the_prompt_position():
    torch.manual_seed(0)
    model = VideoDiT(ModelConfig(width=32, heads=2, depth=1, text_dim=32))
    torch.nn.init.normal_(model.final.weight, std=0.05)
    text = ByteTextEncoder(dim=32, depth=1, heads=2, max_length=16)
    kw = dict(frames=2, height=4, width=4, fps=4.0, diffusion=DiffusionConfig(steps=2), seed=5)
    plain = generate(model, text, ["a", "b"], **kw)
    keyed = generate(model, text, ["a", "b"], item_keys=[(0,), (1,)], **kw)
    assert torch.equal(plain, keyed)
    swapped = generate(model, text, ["b", "a"], item_keys=[(1,), (0,)], **kw)
    torch.testing.assert_close(swapped.flip(0), plain, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="one key per prompt"):
        generate(model, text, ["a", "b"], item_keys=[(0,)], **kw)
    with pytest.raises(ValueError, match="distinct"):
        generate(model, text, ["a", "b"], item_keys=[(3, 1), (3, 1)], **kw)
    with pytest.raises(ValueError, match="distinct"):  # SeedSequence pads short keys with zeros
        generate(model, text, ["a", "b"], item_keys=[(3,), (3, 0)], **kw)
    seq = np.random.SeedSequence([5, 2]).generate_state(1, dtype=np.uint64)[0]
    assert item_generator(5, 2).initial_seed() == int(seq)  # unchanged for existing callers
    assert item_generator(5, 2, 1).initial_seed() != item_generator(5, 2).initial_seed()


def test_prompt_files_and_slugs(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# header\n\n  Hello, World!  \n#skip\nÜber café\n", encoding="utf-8")
    assert [(p.text, p.line) for p in read_prompts_file(path)] == [("Hello, World!", 3), ("Über café", 5)]
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts_file(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match=r"nope\.txt does not exist"):
        read_prompts_file(tmp_path / "nope.txt")
    assert slugify("Hello, World!") == "hello-world"
    assert slugify("Über café") == "uber-cafe"
    assert slugify("!!!") == "prompt"
    long = slugify("a very long prompt " * 10)
    assert len(long) <= 40 and not long.endswith("-")


def test_t5_prompt_length_uses_the_tokenizer(tiny_t5_dir):
    path, _, _ = tiny_t5_dir
    run = load_config(
        [], ["text.encoder=t5", f"text.t5_path={path}", "text.max_length=8", "model.text_dim=32"]
    )
    spec = StageSpec(0, CascadeStageConfig(name="base"), "", run, DiffusionConfig(), 0)
    check_prompt_lengths([spec], ["abcdefg"], ["prompt 0000"])  # 7 bytes + </s> = 8 ByT5 tokens
    with pytest.raises(ValueError, match=r"prompt 0001 is 9 T5 tokens; stage 'base' \(text.max_length=8\)"):
        check_prompt_lengths([spec], ["ok", "abcdefgh"], ["prompt 0000", "prompt 0001"])


def test_replica_resources():
    assert replica_resources("cuda", 8, 3) == {"num_gpus": 1.0}
    assert replica_resources("cuda", 1, 3) == {"num_gpus": pytest.approx(1 / 3)}  # one GPU, three stages
    assert replica_resources("cpu", 2, 4) == {}  # Ray's actor default: room on any node that is left
