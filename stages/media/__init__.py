"""Media in and out, shared by every job: decoding videos (decord, PyAV fallback) and images into clips
at a target frame rate and size, the clip geometry behind it (timestamps, scene cuts, resize/crop), and
writing H.264 mp4s, PNGs and contact sheets. Preprocessing decodes with it, `upscale` decodes a user's
clip with it, and synth, training previews, rendering and the report write with it.

It imports no torch: decode child processes import it (`stages.preprocess.decode_process`).
"""

from stages.media.clips import ClipSpec, center_crop, cover_size, frames_to_decode, resample_indices
from stages.media.decode import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    Clip,
    DecodeError,
    decode_file,
    decode_image,
    decode_video,
)
from stages.media.write import (
    CRF,
    PRESET,
    X264_PARAMS,
    contact_sheet,
    frame_indices,
    pad_to_even,
    write_mp4,
    write_png,
)

__all__ = [
    "CRF",
    "IMAGE_EXTENSIONS",
    "PRESET",
    "VIDEO_EXTENSIONS",
    "X264_PARAMS",
    "Clip",
    "ClipSpec",
    "DecodeError",
    "center_crop",
    "contact_sheet",
    "cover_size",
    "decode_file",
    "decode_image",
    "decode_video",
    "frame_indices",
    "frames_to_decode",
    "pad_to_even",
    "resample_indices",
    "write_mp4",
    "write_png",
]
