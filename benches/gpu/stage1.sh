# On the lent GPU machine, call 1 (carry .gpu/a): the wheels but the CUDA one's
# second half; the first half waits in /tmp for call 2.
set -e
mkdir -p /tmp/g && cp .gpu/a/cuda.part.aa .gpu/a/cuda.name .gpu/a/mlx-*.whl /tmp/g/ && cp -r .gpu/a/tok /tmp/g/tok
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .gpu/a/mlx-*.whl .gpu/a/mlx_lm-*.whl .gpu/a/mlx_vlm-*.whl .gpu/a/llguidance-*.whl .gpu/a/psutil-*.whl .gpu/a/mlxd_protocol-*.whl
python3 -c "import PIL" 2>/dev/null || echo "stage1: no Pillow here: benches/gpu/vision.sh cannot run"
# py-spy apart: stage 2 reinstalls mlx, whose scripts replace /tmp/site/bin.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/spy .gpu/a/py_spy-*.whl
echo stage1 ok
