#!/bin/bash
# Builds .gpu/site: the pure-Python packages this project imports that the lent GPU machines' image lacks (it has
# torch, lightning, torchmetrics, transformers, safetensors, timm, peft; not hydra, omegaconf, diffusers, open_clip,
# webdataset), copied from this checkout's .venv. Ignore .gpu (`echo /.gpu/ >> .git/info/exclude`), carry it, and
# run there with `PYTHONPATH=$PWD/.gpu/site:$PWD/src python3 bench/...` (the image's python3 is 3.12 with its own
# torch; about 39 MiB travels). Used for bench/gpu_runs/2026-11-28_h200.
set -euo pipefail
cd "$(dirname "$0")/.."
site=$(.venv/bin/python -c "import site; print(site.getsitepackages()[0])")
rm -rf .gpu/site && mkdir -p .gpu/site
for pkg in hydra omegaconf antlr4 diffusers open_clip webdataset braceexpand ftfy wcwidth; do
  cp -r "$site/$pkg" .gpu/site/
done
for dist in hydra_core omegaconf antlr4_python3_runtime diffusers open_clip_torch webdataset braceexpand ftfy wcwidth; do
  cp -r "$site/$dist"-*.dist-info .gpu/site/
done
find .gpu/site -name __pycache__ -prune -exec rm -rf {} +
du -sh .gpu/site
