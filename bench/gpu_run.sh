#!/bin/bash
# One call on a lent GPU machine (carry .gpu, built by bench/gpu_assets.sh; writes under $OUT): the wheels, the
# full-size layer_select grid (15 cells side by side), then the step-overhead tables in fp32 and bf16.
# SMOKE=1 PY=python DEV=cpu ... runs the same steps on a machine with kdsearch installed.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
G=${G:-.gpu/layer_select.json} CELLS=${CELLS:-15} GRID_S=${GRID_S:-300} PY=${PY:-python3}
R=$OUT/results.jsonl
if [ -z "${SMOKE:-}" ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  PA=$($PY -c "import pyarrow; print(pyarrow.__version__.split('.')[0])")
  $PY -c "import torch, transformers, pyarrow, huggingface_hub; print(torch.__version__, transformers.__version__, pyarrow.__version__, huggingface_hub.__version__)"
  W=".gpu/whl/omegaconf-*.whl .gpu/whl/antlr4*.whl .gpu/whl/dill-*.whl .gpu/whl/multiprocess-*.whl"
  if [ "$PA" -ge 24 ]; then W="$W .gpu/whl/datasets-*.whl"; else W="$W .gpu/whl4/datasets-*.whl"; fi
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $W || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
$PY -c "import kdsearch.loop, kdsearch.prepare, datasets; print('imports ok, datasets', datasets.__version__)" || exit 1
SECONDS=0
$PY bench/study_grid.py prepare $G || exit 1
echo "prepare: ${SECONDS}s"; SECONDS=0
seq 0 $((CELLS - 1)) | timeout $GRID_S xargs -P $CELLS -I{} $PY bench/study_grid.py cell $G {} --results $R > $OUT/cells.log 2>&1
echo "grid: ${SECONDS}s, rc $?"; grep -c . $R; grep -v "Writing\|Loading" $OUT/cells.log | tail -20
grep -m3 -A12 Traceback $OUT/cells.log
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv
for p in fp32 bf16; do
  SECONDS=0
  timeout ${BENCH_S:-85} $PY bench/step_overhead.py --device ${DEV:-cuda} --teacher .gpu/minilm --rounds 2 --steps ${STEPS:-50} --warmup 5 --precision $p --cache-dir /tmp/kdsearch_bench_cache 2>&1 | grep -v "Writing\|Loading\|it/s\|USDT"
  echo "bench $p: ${SECONDS}s"
done
