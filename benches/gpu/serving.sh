# The serving bench at c=1/8/64 against BatchGenerator at B=c (figures to $OUT).
source benches/gpu/env.sh
set -o pipefail
python3 benches/serving.py --model synthetic-${SHAPE:-1b} --models-dir /tmp/models --mlxd /tmp/g/mlxd \
  --sides ${SIDES:-native,mlxd-shm} --concurrency ${LEVELS:-1,8,64} --native-batch c \
  --max-tokens ${TOKENS:-128} --runs ${RUNS:-3} --skip-single --json-out $OUT/serving.json 2>&1 | tee $OUT/serving.txt
