# Where a vision request's time goes on the GPU: a py-spy profile of every worker
# thread (--idle) while benches/vision.py sends cold and re-ask requests (tiny model;
# $OUT/vspy-*.txt), then the worker-only breakdown (benches/vision_steps.py).
source benches/gpu/env.sh
python3 benches/vision.py --shape tiny --runs ${RUNS:-8} --tokens 8 --mlxd /tmp/g/mlxd --tokenizer-from /tmp/g/tok \
  --models-dir /tmp/models > $OUT/vprof-bench.txt 2>&1 &
bench=$!
worker=""
for _ in $(seq 240); do
  worker=$(pgrep -f "mlxd_worker.*vision-tiny" | head -1)
  [ -n "$worker" ] && break
  sleep 0.5
done
[ -n "$worker" ] || { echo "vision_profile.sh: no worker; see $OUT/vprof-bench.txt" >&2; ps ax | grep -i mlxd >&2; exit 1; }
# The whole life of the worker (its load's frames are apart from the requests').
/tmp/spy/bin/py-spy record -p "$worker" -r 500 -f raw --threads --idle -o $OUT/vspy.txt -d 150 --nonblocking > $OUT/vspy.log 2>&1 &
spy=$!
wait $bench
wait $spy
tail -30 $OUT/vprof-bench.txt
python3 benches/gpu/spytop.py $OUT/vspy.txt --by-thread > $OUT/vspy-threads.txt
sed -n '/^=== /,$p' $OUT/vspy-threads.txt | head -60
python3 benches/vision_steps.py /tmp/models/vision-tiny --runs 5 2>&1 | grep -v WARN | tail -5 | tee $OUT/vsteps.txt
