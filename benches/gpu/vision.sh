# Time to first token with one image (benches/vision.py): the tiny test model and a
# Qwen2-VL-2B shape, 1024x1024, mlxd against mlx-vlm's stream_generate, and the
# cached re-ask (figures to $OUT).
source benches/gpu/env.sh
set -o pipefail
for shape in ${VSHAPES:-tiny 2b}; do
  python3 benches/vision.py --shape $shape --image-size ${IMAGE:-1024} --tokens ${TOKENS:-32} --runs ${RUNS:-3} \
    --mlxd /tmp/g/mlxd --tokenizer-from /tmp/g/tok --models-dir /tmp/models \
    --json-out $OUT/vision-$shape.json 2>&1 | grep -v WARN | tee $OUT/vision-$shape.txt
done
