#!/usr/bin/env bash
# tfcap's GPU path in one command, on a fresh machine with an NVIDIA GPU (aim: under 8 minutes):
#
#   bash tools/gpu_check.sh                 # installs TensorFlow with CUDA and this checkout, then checks
#   bash tools/gpu_check.sh --cpu-dry-run   # the same steps at tiny sizes on a CPU, nothing installed
#
# The install goes into the active virtual environment, else into TFCAP_GPU_CHECK_VENV (default
# ~/.cache/tfcap-gpu-check-venv, made if missing). Prints:
#   1. the Xception encoder at 299 (BatchNorm folded, batch 64), images/s in float32 and mixed_float16;
#   2. training on generated scenes (frozen Xception at 299: its feature cache, then the decoder) under
#      --precision auto, which must choose mixed_float16, with tokens/s (metrics.jsonl) of its second
#      epoch (the first one traces);
#   3. caption-dir of 1,000 generated images with the bundled model, images/s and its ratio to the
#      bundled model's encoder alone;
#   4. the same training under --strategy mirrored, when there are two GPUs or more.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ ${1:-} == --cpu-dry-run ]]; then
  dry=1 batch=2 repeats=1 scenes=48 size=96 photos=48 expected=float32
  py=python3
else
  dry=0 batch=64 repeats=3 scenes=4000 size=299 photos=1000 expected=mixed_float16
  if ! nvidia-smi -L >/dev/null 2>&1; then  # before minutes of installing
    echo "gpu_check: no NVIDIA GPU visible (nvidia-smi -L fails); --cpu-dry-run runs the steps on a CPU" >&2
    exit 1
  fi
  if [[ -z ${VIRTUAL_ENV:-} ]]; then
    venv=${TFCAP_GPU_CHECK_VENV:-$HOME/.cache/tfcap-gpu-check-venv}
    [[ -x $venv/bin/python ]] || python3 -m venv "$venv"
    py=$venv/bin/python
  else
    py=python
  fi
  echo "== installing TensorFlow with CUDA and tfcap from $repo"
  "$py" -m pip install --quiet --upgrade pip
  "$py" -m pip install --quiet "tensorflow[and-cuda]==2.21.*" "$repo"
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/tfcap-gpu-check.XXXXXX")
trap 'rm -rf "$work"' EXIT

quietly='from tfcap.quiet import import_tensorflow; tf = import_tensorflow()'
gpus=$("$py" -c "$quietly; print(len(tf.config.list_physical_devices('GPU')))")
if (( gpus == 0 && ! dry )); then
  echo "gpu_check: TensorFlow sees no GPU although nvidia-smi does (driver too old for CUDA 12?)" >&2
  exit 1
fi
echo "== $gpus GPU(s): $("$py" -c "$quietly; print(tf.__version__, tf.config.list_physical_devices('GPU'))")"

echo "== 1. encoder alone: Xception at 299, batch $batch"
for precision in float32 mixed_float16; do
  "$py" "$repo/tools/bench_caption.py" fold --batch "$batch" --repeats "$repeats" --precision "$precision"
done

scenes() {  # scenes OUT COUNT SIZE [captions]: generated scenes (with captions.csv when asked)
  "$py" -c "$quietly; import sys; from tfcap import synthetic
synthetic.write_scenes(sys.argv[1], synthetic.SceneConfig(images=int(sys.argv[2]), size=int(sys.argv[3])),
                       with_captions=len(sys.argv) > 4)" "$@"
}

train() {  # train NAME [tfcap train option...]: two epochs; the precision chosen and tokens/s
  "$py" -m tfcap train "$work/records" -o "$work/$1" --encoder xception --encoder-weights none \
    --image-size "$size" --batch-size "$batch" --epochs 2 --eval-every 0 --precision auto --quiet "${@:2}"
  "$py" -c 'import json, sys
run, name, expected = sys.argv[1:]
chosen = json.load(open(f"{run}/config.json"))["model"]["precision"]
last = [json.loads(line) for line in open(f"{run}/metrics.jsonl")][-1]
tokens, seconds = last["tokens_per_s"], last["epoch_seconds"]
print(f"{name}: --precision auto chose {chosen}; epoch 2: {tokens:,.0f} tokens/s, {seconds:.1f} s")
sys.exit(None if chosen == expected else f"gpu_check: --precision auto chose {chosen}, not {expected}")
' "$work/$1" "train ${*}" "$expected"
}

echo "== 2. training: $scenes generated scenes, frozen Xception at $size, batch $batch"
scenes "$work/scenes" "$scenes" 64 captions
"$py" -m tfcap build-records --captions "$work/scenes/captions.csv" --images "$work/scenes/images" \
  -o "$work/records" --min-count 1 --quiet
train run

echo "== 3. caption-dir: $photos generated 320-px images, the bundled model"
scenes "$work/photos" "$photos" 320
"$py" "$repo/tools/bench_caption.py" speed "$work/photos" --images "$photos" --notebook-images 0 --repeats 1 \
  --model "$("$py" -c 'from tfcap import pretrained; print(pretrained.path())')"

if (( gpus >= 2 )); then
  echo "== 4. training under --strategy mirrored over $gpus GPUs"
  train run-mirrored --strategy mirrored
else
  echo "== 4. --strategy mirrored: skipped, it needs two GPUs or more"
fi
echo "== gpu_check: done in $SECONDS s"
