# A py-spy profile of the worker's engine thread at c=$LEVEL (default 64; $OUT/spy-top.txt).
source benches/gpu/env.sh
python3 benches/serving.py --model synthetic-${SHAPE:-1b} --models-dir /tmp/models --mlxd /tmp/g/mlxd \
  --sides mlxd-shm --concurrency ${LEVEL:-64} --max-tokens 128 --runs 5 --skip-single > $OUT/prof-bench.txt 2>&1 &
bench=$!
worker=""
for _ in $(seq 240); do
  worker=$(pgrep -f "mlxd_worker --model synthetic-${SHAPE:-1b} " | head -1)
  [ -n "$worker" ] && grep -q "warmed up" $OUT/prof-bench.txt && break
  sleep 0.5
done
[ -n "$worker" ] || { echo "profile.sh: no worker or no warm-up; see $OUT/prof-bench.txt" >&2; kill $bench; exit 1; }
/tmp/spy/bin/py-spy record -p "$worker" -r 250 -f raw -o $OUT/spy.txt -d 12 --nonblocking > $OUT/spy.log 2>&1
wait $bench
python3 benches/gpu/spytop.py $OUT/spy.txt > $OUT/spy-top.txt
