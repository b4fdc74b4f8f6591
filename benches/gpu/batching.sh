# Issue 30's table in one run (scripts/bench batching on the GPU machine): aggregate
# tok/s, TTFT p50/p95 and errors at c=1/8/32/64 for BatchGenerator given each burst
# whole, mlxd with default settings and with max_concurrent = 64; the constrained
# batch at B=8/64; a short prompt's TTFT against one after a cached ~4k-token prefix.
source benches/gpu/env.sh
set -o pipefail
model="--model synthetic-${SHAPE:-1b} --models-dir /tmp/models --mlxd /tmp/g/mlxd"
python3 benches/serving.py $model --sides native,mlxd-shm,mlxd-wide --concurrency ${LEVELS:-1,8,32,64} \
  --native-batch c --max-tokens ${TOKENS:-128} --runs ${RUNS:-3} --skip-single --json-out $OUT/batching.json \
  2>&1 | tee $OUT/batching.txt
python3 benches/constrained.py $model --batch-sizes 8,64 --max-tokens ${TOKENS:-128} --runs 3 \
  --json-out $OUT/constrained.json 2>&1 | tee $OUT/constrained.txt
python3 benches/prompt_cache.py $model --runs 3 --turns 4 2>&1 | tee $OUT/prompt-cache.txt
