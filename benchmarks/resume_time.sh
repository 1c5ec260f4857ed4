#!/bin/bash
# Resume time with and without a resize, side by side: a 2-rank run (ZeRO-2, fp32, depth 4,
# width 256) stopped at step 2 is resumed three times each on 2 ranks (same world size), 1 and
# 4 ranks (a universal-checkpoint conversion first). Prints the seconds from the command's first
# log line to "resumed from" and for the whole command (to step 4).
#   bash benchmarks/resume_time.sh CODES_MANIFEST TOKENIZER
# CODES_MANIFEST and TOKENIZER: shards and tokenizer of configs/tiny_cpu.yaml's shape (4 scales,
# 64 codes), e.g. what the quickstart or tests/conftest.py makes.
set -e
CONFIG=$(cd "$(dirname "$0")/.." && pwd)/configs/tiny_cpu.yaml
cd "$(mktemp -d)"
COMMON="model.depth=4 model.embed_dim=256 model.num_heads=4 tokenizer.checkpoint=$2 tokenizer.options={} data.train_manifest=$1 train.micro_batch_size=auto train.max_micro_batch_size=2 checkpoint.every_steps=2"
rm -rf base; mvar-dist train --config $CONFIG --nproc 2 run.dir=base $COMMON train.total_steps=4 debug.stop_at_step=2 > base.log 2>&1
for rep in 1 2 3; do
  for world in 2 1 4; do
    rm -rf r; cp -r base r
    start=$(date +%s.%N)
    mvar-dist train --config $CONFIG --nproc $world run.dir=r $COMMON train.total_steps=4 > r.log 2>&1
    end=$(date +%s.%N)
    first=$(grep -m1 -oE "^[0-9-]+ [0-9:]+,[0-9]+" r.log); resumed=$(grep -m1 "resumed from" r.log | grep -oE "^[0-9-]+ [0-9:]+,[0-9]+")
    python -c "
from datetime import datetime as d
f=lambda s: d.strptime(s, '%Y-%m-%d %H:%M:%S,%f')
print('rep $rep world 2 -> $world: start->resumed %.2f s, whole command %.2f s' % ((f('$resumed')-f('$first')).total_seconds(), $end-$start))"
  done
done
