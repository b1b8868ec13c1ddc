#!/bin/bash
# GPU suite runner (issue 15): each item has its own timeout and output file under $OUT.
export PYTHONPATH=$PWD/.gpu/site:$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
O=${OUT:-/tmp/out}; mkdir -p $O
{ date; nvidia-smi -L; python3 -c "import torch,sys;print(sys.version);print(torch.__version__, torch.cuda.get_device_name())";
  python3 -c "import diffusers, hydra, omegaconf, open_clip, webdataset, lightning; print('imports ok', diffusers.__version__, lightning.__version__)"; } > $O/env.txt 2>&1
item() { local name=$1 t=$2; shift 2; local s=$(date +%s); timeout $t "$@" > $O/$name.txt 2>&1; echo "rc=$? wall=$(( $(date +%s)-s ))s" >> $O/$name.txt; }
item stage2_b32 90 python3 bench/stage2_step.py --device cuda --dtype bf16 --preset ldm_256 --repeats 3
item backbone_b2 90 python3 bench/backbone_step.py --device cuda --dtype bf16 --preset b2
item sample_sdlike 90 python3 bench/sample_throughput.py --device cuda --dtype bf16 --preset sd-like --repeats 3
item stage2_b128 90 python3 bench/stage2_step.py --device cuda --dtype bf16 --preset ldm_256 --batch 128 --repeats 2 --steps 5
item backbone_b2_compile 130 python3 bench/backbone_step.py --device cuda --dtype bf16 --preset b2 --compile
