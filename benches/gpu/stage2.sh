# Call 2 (carry .gpu/b): the CUDA wheel joined and installed, the daemon binary, a
# synthetic 1B 4-bit model (SHAPE=8b for the larger one).
set -e
wheel=/tmp/g/$(cat /tmp/g/cuda.name)
cat /tmp/g/cuda.part.aa .gpu/b/cuda.part.ab > "$wheel"
# With mlx's own wheel in the same call: pip --target --upgrade replaces a top-level
# folder both wheels write (mlx/) rather than merging a second call's into it.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  /tmp/g/mlx-*.whl "$wheel"
cp .gpu/b/mlxd /tmp/g/mlxd && chmod +x /tmp/g/mlxd
source benches/gpu/env.sh
python3 -c "import mlx.core as mx; print(mx.default_device(), mx.__version__)"
mkdir -p /tmp/models
python3 scripts/synthetic_model.py --tokenizer-from /tmp/g/tok --out /tmp/models/synthetic-${SHAPE:-1b} \
  --shape ${SHAPE:-1b} --bits 4 >/dev/null
echo stage2 ok
