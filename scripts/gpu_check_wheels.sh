#!/usr/bin/env bash
# Wheels for a GPU machine without a network whose Python already has torch, transformers, accelerate and pytest
# (a CUDA image usually does) but not the rest of clue_adv's dependencies: pydantic, datasets and what those two
# need beyond numpy, pyarrow, pandas and huggingface-hub. Download them here; carry the folder; install them there
# without an index, beside the image's own packages (nothing of the image is replaced but typing-extensions):
#
#   scripts/gpu_check_wheels.sh [DIR]                 # DIR: a new folder, default .whl (git-ignored)
#   PYTHON_VERSION=3.11 scripts/gpu_check_wheels.sh   # the GPU machine's Python, if not 3.12
#   # there:
#   python3 -m pip install --no-index --no-deps --target /tmp/clue-adv-deps DIR/*.whl
#   PYTHONPATH=/tmp/clue-adv-deps:$PWD python3 scripts/gpu_check.py
#
# The versions are the ones installed where this runs (the ones the project was tested with), so run it in the
# project's environment. Anything else that machine lacks: name it in EXTRA (e.g. EXTRA="rich==14.1.0"); the
# check's first step (env) lists every import that fails there.
set -euo pipefail

dir=${1:-.whl}
python=${PYTHON:-python3}
if [ -d "$dir" ] && [ -n "$(ls -A "$dir")" ]; then
    echo "error: $dir is not empty (two versions of one package stop the install there); remove it or name another" >&2
    exit 2
fi
packages=(pydantic pydantic-core annotated-types typing-inspection typing-extensions datasets dill multiprocess)
specs=()
for name in "${packages[@]}"; do
    version=$("$python" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name" 2>/dev/null) \
        || { echo "error: $name is not installed here; run this in the project's environment" >&2; exit 2; }
    specs+=("$name==$version")
done
# shellcheck disable=SC2206  # EXTRA is a space-separated list of requirement specifiers
specs+=(${EXTRA:-})
# Binary wheels for x86-64 Linux and that Python, whatever this machine is; --no-deps: the list above is complete
# for what the image lacks, and pip must not fetch a second torch.
"$python" -m pip download --no-deps --only-binary=:all: \
    --python-version "${PYTHON_VERSION:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dir" "${specs[@]}"
echo "wheels in $dir: $(ls "$dir" | wc -l) files, $(du -sh "$dir" | cut -f1)"
