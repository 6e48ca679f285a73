"""`python -m stages.train.universal DS_DIR OUT_DIR`: DeepSpeed's universal-checkpoint conversion of one
saved DeepSpeed state, run in its own process by `stages.train.elastic`.

DeepSpeed's converter (`deepspeed.checkpoint.ds_to_universal`) unpickles every file with
`weights_only=False`; here every `torch.load` it makes is `weights_only=True`, allowing only DeepSpeed's
own checkpoint types (`stages.train.checkpoint.DEEPSPEED_TYPES`), so a planted file is refused, not run.
It runs serially (one extract and one merge worker): its process pools would fork a process that holds
a training's threads.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def convert(source: str, target: str) -> None:
    import torch
    from deepspeed.checkpoint import ds_to_universal

    from stages.train.checkpoint import deepspeed_types, load_tensors

    real_load = torch.load
    allowed = deepspeed_types()

    def safe_load(f: Any, map_location: Any = None, **_: Any) -> Any:
        return load_tensors(f, allowed, map_location)

    torch.load = safe_load
    try:
        ds_to_universal.main(
            argparse.Namespace(
                input_folder=source,
                output_folder=target,
                num_extract_workers=1,
                num_merge_workers=1,
                keep_temp_folder=False,
                strict=True,
                inject_missing_state=True,  # Tessera's engines record no universal-checkpoint info
            )
        )
    finally:
        torch.load = real_load


if __name__ == "__main__":
    convert(*sys.argv[1:3])
