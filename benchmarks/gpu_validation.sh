#!/usr/bin/env bash
# Issue 8's GPU validation in one call, for a GPU machine lent for minutes: the gpu-marked tests, the
# GPU checkpoint benchmark (dtrain vs DCP from device memory), and configs/gpt-1b.yaml for a few
# steps with async checkpoints and a resume. Stages run in that order under one deadline
# (BUDGET_S seconds, default 520) and each writes its log and outputs under OUT as it goes, so a cut
# keeps what finished.
#   OUT=/tmp/gpu BUDGET_S=520 bash benchmarks/gpu_validation.sh
# SIZES, REPEATS, DEVICE pick the benchmark's points; BENCH_S caps its stage; GPT1B=0 skips gpt-1b.
# On a machine without our dependencies, wheels in .whl/ are installed into /tmp/site first.
set -u
OUT=${OUT:-benchmarks/results/gpu}
PY=${PY:-python3}
BUDGET_S=${BUDGET_S:-520}
SIZES=${SIZES:-1G,4G}
REPEATS=${REPEATS:-2}
START=$(date +%s)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
left() { echo $((BUDGET_S - ($(date +%s) - START))); }
cap() { local t=$(( $(left) - ${2:-0} )); t=$(( t < $1 ? t : $1 )); echo $(( t < 10 ? 10 : t )); }  # seconds for a stage
stage() { echo; echo "=== $1 ($(left) s left) ==="; }

exec > >(tee -a "$OUT/gpu_validation.log") 2>&1
stage environment
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch, sys; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.get_device_name(0), torch.cuda.device_count(), 'nccl', torch.cuda.nccl.version())"
nproc; free -g | head -2; df -h /tmp | tail -1

stage "pytest -m gpu"
timeout "$(cap 200)" $PY -m pytest -m gpu tests/test_gpu.py -v -p no:cacheprovider -rs

stage "checkpoint benchmark: $SIZES x $REPEATS"
# the gpt-1b stage after it needs ~130 s; without it (GPT1B=0) the benchmark may use all that is left
timeout "$(cap "${BENCH_S:-400}" "$([ "${GPT1B:-1}" = 1 ] && echo 130 || echo 5)")" $PY benchmarks/checkpoint_gpu.py --device "${DEVICE:-cuda}" --sizes "$SIZES" \
  --repeats "$REPEATS" --out "$OUT/checkpoint_gpu"

[ "${GPT1B:-1}" = 1 ] || exit 0
stage "configs/gpt-1b.yaml on one GPU: 4 steps, async saves at 2 and 4, then a resume to 5"
RUN=/tmp/gpt-1b
JOB=(train --config configs/gpt-1b.yaml "run_dir=$RUN" logging.progress=false train.log_every=1 train.max_steps=4
     train.eval_every=4 checkpoint.every_steps=2 checkpoint.keep_last_n=1 checkpoint.keep_best_k=0
     checkpoint.keep_every_n_steps=0 data.batch_size=16 data.grad_accum=2 data.eval_batch_size=8
     data.options.max_chars=2000000)
timeout "$(cap 400 60)" $PY -m dtrain "${JOB[@]}" && timeout "$(cap 400 5)" $PY -m dtrain "${JOB[@]}" train.max_steps=5
cp "$RUN/train.log" "$OUT/gpt1b_train.log" 2>/dev/null
cp "$RUN/summary.json" "$OUT/gpt1b_summary.json" 2>/dev/null
cp "$RUN/metrics.jsonl" "$OUT/gpt1b_metrics.jsonl" 2>/dev/null
rm -rf "$RUN"
stage done
