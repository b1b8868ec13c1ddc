#!/bin/bash
export PYTHONPATH=$PWD/.gpu/site:$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
O=${OUT:-/tmp/out}; mkdir -p $O
item() { local name=$1 t=$2; shift 2; local s=$(date +%s); timeout $t "$@" > $O/$name.txt 2>&1; echo "rc=$? wall=$(( $(date +%s)-s ))s" >> $O/$name.txt; }
item backbone_b2_b128 90 python3 bench/backbone_step.py --device cuda --dtype bf16 --preset b2 --batch 128 --repeats 2
item backbone_b2_b128_compile 140 python3 bench/backbone_step.py --device cuda --dtype bf16 --preset b2 --batch 128 --repeats 2 --compile
item stage2_b256 70 python3 bench/stage2_step.py --device cuda --dtype bf16 --preset ldm_256 --batch 256 --repeats 2 --steps 4
