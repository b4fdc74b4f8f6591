# What the daemon and the benches need on the GPU machine (stage1.sh, stage2.sh).
export PYTHONPATH=/tmp/site MLXD_PYTHON=python3 MLXD_WORKER_DIR=$PWD/python-worker \
  MLXD_MODELS_DIR=/tmp/models PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
