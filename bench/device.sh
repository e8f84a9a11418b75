#!/usr/bin/env bash
# Run a command (the bench) on the GPU machine with the wheels carried as ../shared/GPU.md says:
# call 1 copies .gpu1/* to /tmp/keep; this script (call 2 and later, carrying .gpu2 and
# .benchwheels) unpacks mlx-cuda-13, mlx, mlx-lm and the gateway's wheels into /tmp/site once,
# links this checkout in as the mlx_supervisor package, and runs "$@" with that PYTHONPATH.
#   bash bench/device.sh python3 -m bench --model-size large --only decode
set -euo pipefail
site=/tmp/site
root=$(pwd)
if [ ! -e "$site/.ready" ]; then
  mkdir -p "$site"
  cat /tmp/keep/part.aa "$root/.gpu2/part.ab" | xz -d | (cd "$site" && tar xf -)
  for w in /tmp/keep/*.whl "$root"/.benchwheels/*.whl; do
    (cd "$site" && python3 -m zipfile -e "$w" .)
  done
  touch "$site/.ready"
fi
mkdir -p "$site/mlx_supervisor"
for p in gateway worker shared; do ln -sfn "$root/$p" "$site/mlx_supervisor/$p"; done
export PYTHONPATH="$site:$root" PYTHONUNBUFFERED=1
"$@"
