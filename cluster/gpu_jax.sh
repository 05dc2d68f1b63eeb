#!/usr/bin/env bash
# The tool measured on a GPU under JAX, where TensorFlow is absent (the project's lent H200 has
# jax with CUDA, numpy, scikit-image, click and tensorboard, but neither TensorFlow nor Keras).
#
#   bash cluster/gpu_jax.sh bench   # benchmark model rows: default U-Net, TinyUNet, classic;
#                                   # float32 and mixed bfloat16; TinyUNet also at NVIDIA's
#                                   # published point (batch 16, 512x512, AMP)
#   bash cluster/gpu_jax.sh cv      # docs/results.md's five-fold protocol of the default, timed
#
# Prepared here, once, from the repository root (nothing of it is committed):
#   printf '/.whl/\n/.gpu-data/\n' >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#       --platform manylinux_2_17_x86_64 -d .whl keras==3.15.1 namex optree
#   mkdir -p .gpu-data/roadseg && cp -r ../shared/data/roadseg/training .gpu-data/roadseg/
# and run on the device with carry [".whl", ".gpu-data"]. Results go to $OUT (else ./gpu-out):
# the benchmark's JSON and tables, the cross-validation's log, metrics.json and wall time; its
# run folders stay in a temporary folder.
# QUICK=1 runs the same steps at smoke sizes (any machine with jax, on its CPU too).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import keras" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
quick=()
[ "${QUICK:-0}" = 1 ] && quick=(--quick)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1 || true
python3 -c "import jax, keras; print('jax', jax.__version__, 'keras', keras.__version__, \
jax.devices())" | tee "$OUT/versions.txt"

case "${1:-}" in
    bench)
        for policy in float32 mixed_bfloat16; do
            python3 bench_cil.py "${quick[@]}" --part peak --part models --policy "$policy" \
                -o "$OUT/bench-$policy.json" | tee "$OUT/bench-$policy.md"
        done
        # NVIDIA UNet_Industrial's published TinyUNet figure: 255 images/s, A100, AMP, batch 16
        python3 bench_cil.py "${quick[@]}" --part peak --part models --policy mixed_bfloat16 \
            --row tiny-unet --side 512 --batch 16 -o "$OUT/bench-nvidia-point.json" \
            | tee "$OUT/bench-nvidia-point.md"
        ;;
    cv)
        data=(--data-dir .gpu-data/roadseg --epochs 20)
        [ "${QUICK:-0}" = 1 ] && data=(--demo --epochs 2)
        runs=$(mktemp -d)           # checkpoints stay there: $OUT takes a few small files
        start=$(date +%s)
        python3 main_cil.py "${data[@]}" --folds 5 --patience 0 --verbose 2 --run-name gpu-cv \
            --logs-dir "$runs/logs" --valid-output-dir "$runs/valid" 2>&1 | tee "$OUT/cv.log"
        echo "five folds: $(( $(date +%s) - start )) s" | tee "$OUT/cv-time.txt"
        cp "$runs/logs/gpu-cv/metrics.json" "$OUT/cv-metrics.json"
        ;;
    *)
        echo "usage: bash cluster/gpu_jax.sh bench|cv" >&2
        exit 2
        ;;
esac
