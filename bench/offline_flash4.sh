#!/usr/bin/env bash
# FlashAttention-4 for a GPU machine without network (the `run` device), in two archives of < 64 MiB.
#
#   here:     bash bench/offline_flash4.sh            -> .fa1/bigso.xz (50 MB), .fa2/rest.tar.xz (20 MB)
#   device:   call 1, carry .fa1:  mkdir -p /tmp/fa && cp .fa1/bigso.xz /tmp/fa/
#             call 2 (right after, while the machine is warm), carry .fa2:
#               bash bench/offline_flash4.sh --install && export PYTHONPATH=$(cat /tmp/fa/pythonpath):$PYTHONPATH
#
# Wheels for CPython 3.12 and CUDA 13 (the device's torch 2.11+cu130); the versions session 10 checked.
# Add .fa1/ and .fa2/ to .git/info/exclude: they are carried, not committed.
set -euo pipefail
BIG=nvidia_cutlass_dsl/dsl_packages/cutlass/_mlir/_mlir_libs/_cutlass_ir.cu13.cpython-312-x86_64-linux-gnu.so
if [ "${1:-}" = "--install" ]; then
  mkdir -p /tmp/fa/site && cd /tmp/fa/site
  tar -xJf "$OLDPWD/.fa2/rest.tar.xz" && xz -dc /tmp/fa/bigso.xz > "$BIG"
  echo "/tmp/fa/site:/tmp/fa/site/nvidia_cutlass_dsl/dsl_packages" > /tmp/fa/pythonpath
  exit 0
fi
W=$(mktemp -d)
for p in flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
         nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 quack-kernels==0.6.5 \
         apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5; do
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$W/whl" "$p"
done
mkdir -p "$W/site" .fa1 .fa2
for w in "$W"/whl/*.whl; do unzip -q -o "$w" -d "$W/site"; done
rm -rf "$W/site/nvidia_cutlass_dsl/cu13/lib/stubs" "$W/site/tvm_ffi/3rdparty"   # not needed on x86-64 Linux
xz -T0 -9 -c "$W/site/$BIG" > .fa1/bigso.xz
(cd "$W/site" && tar --exclude="./$BIG" -cf - . | xz -T0 -6 > "$OLDPWD/.fa2/rest.tar.xz")
rm -rf "$W"
ls -la .fa1 .fa2
