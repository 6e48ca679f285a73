#!/usr/bin/env bash
# Wheels for a GPU machine that has torch but no internet (Python 3.12, x86-64 Linux): what the GPU
# benchmarks (attention, factorized_vs_full, model_step, train_step, render) import beyond such an
# image's own torch, numpy, einops, safetensors, pyyaml, tqdm, psutil, packaging, msgpack, ninja,
# py-cpuinfo and nvidia-ml-py. Writes them to .whl/ (git-ignored through .git/info/exclude); there:
#   pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
# DeepSpeed has no wheel on PyPI: it is built here, without ops (they JIT-compile on first use there).
# bench/loader.py is not covered: it preprocesses with Ray Data, whose wheel alone is over 64 MiB.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

dest=.whl
python=${PYTHON:-.venv/bin/python}
mkdir -p "$dest"
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"

platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dest" \
  xformers==0.0.35 av==19.0.2 webdataset==1.0.2 braceexpand==0.1.7 \
  omegaconf==2.4.0 antlr4-python3-runtime==4.13.2 hjson==3.1.0 \
  pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing-extensions==4.16.0

deepspeed=$("$python" -c 'from importlib.metadata import version; print(version("deepspeed"))')
DS_BUILD_OPS=0 "$python" -m pip wheel --quiet --no-deps --no-build-isolation -w "$dest" "deepspeed==$deepspeed"

du -ch "$dest"/*.whl | tail -1
