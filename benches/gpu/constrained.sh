# Constrained decoding on the GPU: the batch's masks (mlx-lm's per-row step vs the
# worker's, B=8 and 64), native stream_generate and mlxd with 1 and 8 streams.
source benches/gpu/env.sh
set -o pipefail
python3 benches/constrained.py --model synthetic-${SHAPE:-1b} --models-dir /tmp/models --mlxd /tmp/g/mlxd \
  --parts ${PARTS:-batch,native,mlxd} --batch-sizes ${BATCHES:-8,64} --max-tokens ${TOKENS:-128} \
  --runs ${RUNS:-5} --json-out $OUT/constrained.json 2>&1 | tee $OUT/constrained.txt
