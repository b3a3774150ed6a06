#!/usr/bin/env bash
# NVIDIA DALI for the GPU machine (Python 3.12, x86-64, no network), as small as it goes, into
# .devwheels/dali-slim-NN (git-ignored), parts of at most MAX_PART_MB (default 56) that the device
# tool carries one per call; launch/gpu_check.sh installs them (docs/gpu_check.md: the DALI window).
#   bash launch/pack_dali.sh [MAX_PART_MB]          # on a machine with network, from the project root
#
# What the parts hold is an installed tree (no pip needed there: extract and go), measured to be
# what DALI's import and decode need (docs/gpu_check.md has the numbers):
#   nvidia-dali-cuda130   only its CPython 3.12 modules (it ships 3.10 to 3.15t), no C++ headers
#   nvidia-nvimgcodec     DALI's decoders; without the nvTIFF and nvJPEG2K extensions (not JPEG,
#                         and each prints an error at load when its library is absent)
#   nvidia-nvjpeg         the CUDA JPEG decoder behind mixed decode (torch's CUDA wheels lack it)
#   nvtx makefun astunparse gast libcst optree six    DALI's pure-Python needs
# Left out: nvidia-libnvcomp (28 MB): no DALI library links it; DALI loads it for its inflate
# operator alone, which vae-dist does not use. Every shared library is stripped of its symbol
# table (dlopen/dlsym read only the dynamic one), then the tree is tar'ed and xz-compressed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
max=${1:-56}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d "$work/wheels" nvidia-dali-cuda130 "nvidia-nvimgcodec-cu13<0.10" nvidia-nvjpeg \
  nvtx makefun astunparse gast libcst optree six 2>&1 | grep -v 'is ignored' || true
python3 -m pip install -q --no-deps --no-compile --only-binary=:all: --python-version 3.12 --implementation cp \
  "${plat[@]}" --target "$work/site" "$work"/wheels/*.whl
site="$work/site"
find "$site" -name '*.cpython-3*' ! -name '*.cpython-312-*' -delete
rm -rf "$site/nvidia/dali/include" "$site"/bin
rm -f "$site"/nvidia/nvimgcodec/extensions/libnvtiff_ext* "$site"/nvidia/nvimgcodec/extensions/libnvjpeg2k_ext*
find "$site" -name '*.so*' -type f -exec strip --strip-unneeded {} + 2>/dev/null || true
mkdir -p .devwheels
rm -f .devwheels/dali-slim-*
tar cf - -C "$site" . | xz -T0 -6 | split -b "${max}m" -d -a 2 - .devwheels/dali-slim-
echo "wheels: $(du -ch "$work"/wheels/*.whl | tail -1 | cut -f1); installed and pruned: $(du -sh "$site" | cut -f1)"
ls -la .devwheels/dali-slim-*
echo "carry one part per call, back to back (docs/gpu_check.md: the DALI window)"
