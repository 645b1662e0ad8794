#!/usr/bin/env bash
# Every GPU measurement of the project in one pass, on a machine with one NVIDIA GPU,
# a python3 that has torch with CUDA (plus numpy, onnx, grpcio, prometheus-client),
# and no network. Results go under $OUT (default bench/results/gpu):
#
#   env.txt          GPU, driver, torch/onnxruntime versions and providers
#   session.log      everything the steps printed
#   runs.tar.gz      metrics.jsonl, curves.png, samples.txt and logs of every training run
#   default.pt       the 2x256 run's best weights, slimmed (no optimizer state) for export
#   code.pt          the source-code model's best weights, slimmed
#   serving_gpu.json onnxruntime CUDA step rates and engine parity (when the CUDA provider works)
#
#   quality/         (quality mode) bests.txt (each run's exit status and best val loss), runs.tar.gz,
#                    rnn_kernels.txt (the cuDNN kernel under weight-drop, and its cost)
#
#   serving/         (serving mode) serving.md, serving.json: the end-to-end table through real gRPC at
#                    1, 64, 1024, 4096 streams (the load generator in 8 processes), against the raw step
#                    and PyTorch eager; serving_gpu.json: the host-sampling against the device-sampler step
#                    at 1024 and 4096 rows, seeded isolation among 4,096 streams, the card's name;
#                    kstep.md: the K-step decode graph alone against K single steps (bench/kstep.py),
#                    with host inputs and outputs, with I/O binding (the state kept on the card), and with
#                    CUDA graphs on top (a variant that does not capture says why in the table);
#                    serving-cuda-graphs/: the end-to-end table again with --cuda-graphs on
#
#   ddp/             (ddp mode) training_ddp_cuda.md, .json: the trainer's characters per second at 1, 2, 4, ...
#                    ranks, one per GPU (bench/training_ddp.py; one GPU gives the 1-rank point alone);
#                    multinode_cuda.md, .json (two GPUs or more): two torchrun launchers on 127.0.0.1 as two
#                    nodes splitting the GPUs, a worker and then a whole node killed mid-run, each run's
#                    losses and final weights against the uninterrupted run's (bench/multinode.py)
#
# Usage: bench/gpu_session.sh [smoke|serving|quality|ddp|full]
#   CONCURRENCY=1,64,1024,4096         the serving mode's stream counts; DURATION=8 seconds per point
#   (onnxruntime without the CUDA provider: bench/ort_gpu_wheel.sh brings onnxruntime-gpu in parts)
#   DATA=path/to/tinyshakespeare.txt   (default ../shared/data/tinyshakespeare.txt)
#   ORT_SITE=dir                       a folder holding an onnxruntime-gpu install to use
#   TRAIN_SECONDS=300                  wall-clock budget of each training run (full mode)
#   DEVICE=cuda                        cpu runs the quality mode's logic on a machine without a GPU
#   QUALITY_FLAGS=                     appended to every quality run, e.g. a tiny model for that dry run
#   QUALITY_SETS="shipped awd"         the quality mode's waves of runs, one after the other:
#                                        shipped  the shakespeare preset as shipped and four variants of it
#                                        awd      the shakespeare-awd recipe (weight-drop, locked dropout,
#                                                 moving average, varied windows): 2x1024, 3x1024, 2x1024
#                                                 without weight-drop, 2x1024 with a second seed
#   PARALLEL=1                         the runs of a wave at once on the GPU; 0 runs them one at a time
#                                        (a CPU dry run)
#   KERNEL_FLAGS=                      appended to bench/rnn_kernels.py, e.g. a small model for that dry run
#   DDP_RANKS=1,2,4,8                  the ddp mode's rank counts (default: 1, 2, 4, 8 up to the GPUs there are;
#                                        DEVICE=cpu: 1,2 with gloo, the dry run of this mode)
#   DDP_PRESET=shakespeare DDP_STEPS=100 DDP_REPEATS=2   the ddp mode's model (batch per rank) and runs
#                                      (dry run: DEVICE=cpu DDP_PRESET=tiny DDP_STEPS=20 DDP_REPEATS=1 OUT=/tmp/ddp-dry)
set -uo pipefail
MODE=${1:-full}
OUT=${OUT:-bench/results/gpu}
DATA=${DATA:-../shared/data/tinyshakespeare.txt}
TRAIN_SECONDS=${TRAIN_SECONDS:-300}
DEVICE=${DEVICE:-cuda}
QUALITY_FLAGS=${QUALITY_FLAGS:-}
QUALITY_SETS=${QUALITY_SETS:-shipped awd}
PARALLEL=${PARALLEL:-1}
KERNEL_FLAGS=${KERNEL_FLAGS:-}
RUNS=${RUNS:-/tmp/charrnn-runs}
mkdir -p "$OUT" "$RUNS"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/session.log") 2>&1

# charrnn importable without installing: the rooms are subpackages of `charrnn`.
PKG=/tmp/charrnn-pkg
rm -rf "$PKG" && mkdir -p "$PKG/charrnn"
cp -r charrnn/. "$PKG/charrnn/"
for room in training:training exporter:exporter service:service inspector:inspector; do
  ln -s "$PWD/${room%%:*}" "$PKG/charrnn/${room##*:}"
done
export PYTHONPATH="$PKG${ORT_SITE:+:$ORT_SITE}${PYTHONPATH:+:$PYTHONPATH}"
run() { python3 -P -c "import sys; from charrnn.$1 import main; sys.argv[0] = '$2'; sys.exit(main())" "${@:3}"; }

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
try:
    import onnxruntime as ort
    print("onnxruntime", ort.__version__, ort.__file__, ort.get_available_providers())
except Exception as e:
    print("onnxruntime import failed:", e)
import google.protobuf, grpc, prometheus_client
print("protobuf", google.protobuf.__version__, "grpcio", grpc.__version__)
import sysconfig; print("stdlib", sysconfig.get_paths()["stdlib"])
EOF
} | tee "$OUT/env.txt"

STDLIB=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
# The lowest value of a metrics.jsonl field ("val_loss" does not match "ema_val_loss"); "-" when there is none.
lowest() {  # field, metrics.jsonl
  grep -o "\"$1\": [0-9.]*" "$2" 2>/dev/null | cut -d' ' -f2 | sort -n | head -1 | grep . || echo -
}
# One charrnn-train run into $RUNS/NAME (its output in $RUNS/NAME.log); prints its exit status and best val
# losses, of the raw weights and of their moving average (--ema-decay).
train_run() {  # name, then flags
  local name=$1; shift
  run training.cli charrnn-train --out "$RUNS/$name" "$@" > "$RUNS/$name.log" 2>&1
  local rc=$?
  echo "$name exit $rc best val_loss $(lowest val_loss "$RUNS/$name/metrics.jsonl") ema_val_loss $(lowest ema_val_loss "$RUNS/$name/metrics.jsonl")"
}

if [ "$MODE" = smoke ]; then
  # Seconds: one short CUDA training run and one export, to catch breakage before the long pass.
  run training.cli charrnn-train --data "$DATA" --out "$RUNS/smoke" --preset tiny --device cuda --max-steps 60 \
    && run exporter.cli charrnn-export "$RUNS/smoke" --name smoke --repo "$RUNS/models" \
    && echo "SMOKE OK"
  python3 -m bench.gpu_serving --quick --out "$OUT/serving_gpu.json" || echo "gpu_serving failed"
  exit 0
fi

if [ "$MODE" = serving ]; then
  # DEVICE=cpu: the same steps on the CPU with small sizes, a dry run of this mode without a GPU.
  DRY=$([ "$DEVICE" = cpu ] && echo --dry-run || true)
  python3 -m bench.gpu_serving $DRY --out "$OUT/serving_gpu.json" || echo "gpu_serving failed"
  python3 -m bench.serving --device "$DEVICE" --concurrency "${CONCURRENCY:-1,64,1024,4096}" \
    --duration "${DURATION:-8}" --client-processes 8 --baseline-rev '' --no-naive --out "$OUT/serving" \
    || echo "bench.serving failed"
  # The K-step decode graph alone against K single steps of the device path: what a K-step call buys before
  # any host work, and whether its I/O binding and CUDA graphs work on this card (decode_graph.BoundDecode;
  # the LSTM operator, and the lowered cell where it does not capture).
  KSTEP_BATCH=$([ "$DEVICE" = cpu ] && echo 1,8 || echo 1,64,1024,4096)
  python3 -m bench.kstep --device "$DEVICE" --threads 0 --batch "$KSTEP_BATCH" --steps 1,8,16 --no-loop --lowered \
    --out "$OUT/serving/kstep.md" || echo "bench.kstep failed"
  # End to end again with --cuda-graphs on (the engine's plain K-step calls captured; ignored on the CPU).
  python3 -m bench.serving --device "$DEVICE" --concurrency "${CONCURRENCY:-1,64,1024,4096}" \
    --duration "${DURATION:-8}" --client-processes 8 --baseline-rev '' --no-naive --server-args "--cuda-graphs on" \
    --out "$OUT/serving-cuda-graphs" || echo "bench.serving --cuda-graphs on failed"
  exit 0
fi

if [ "$MODE" = ddp ]; then
  # Data-parallel training under torchrun (docs/training.md, "From one machine to many"). The workers
  # torchrun starts must find charrnn in $PKG, not the bare ./charrnn of the working tree: PYTHONSAFEPATH
  # keeps the current folder off every python's path, and bench/ and testkit/ come from $PWD after $PKG.
  export PYTHONSAFEPATH=1 PYTHONPATH="$PYTHONPATH:$PWD"
  mkdir -p "$OUT/ddp"
  if [ "$DEVICE" = cpu ]; then GPUS=2; else GPUS=$(nvidia-smi -L | wc -l); fi
  RANKS=${DDP_RANKS:-$(for n in 1 2 4 8 16; do [ "$n" -le "$GPUS" ] && echo "$n"; done | paste -sd,)}
  python3 -m bench.training_ddp --device "$DEVICE" --ranks "$RANKS" --preset "${DDP_PRESET:-shakespeare}" \
    --steps "${DDP_STEPS:-100}" --repeats "${DDP_REPEATS:-2}" --data "$DATA" --out "$OUT/ddp" || echo "training_ddp failed"
  if [ "$GPUS" -ge 2 ]; then
    python3 -m bench.multinode --device "$DEVICE" --nproc $((GPUS / 2)) --data "$DATA" --out "$OUT/ddp" \
      || echo "multinode failed"
  else
    echo "one GPU: no two-node run (NCCL needs a GPU per rank)"
  fi
  exit 0
fi

if [ "$MODE" = quality ]; then
  mkdir -p "$OUT/quality"
  # Which recurrent kernel weight-drop and locked dropout reach (cuDNN's, as without them, with its
  # weights compacted again at every call) and what that costs, at the awd recipe's size.
  python3 bench/rnn_kernels.py --device "$DEVICE" --hidden 1024 --batch 128 --seq-len 256 --seconds 20 $KERNEL_FLAGS \
    2>&1 | tee "$OUT/quality/rnn_kernels.txt"
  quality() {  # name, then flags: one run, its line in bests.txt
    local name=$1; shift
    train_run "$name" --data "$DATA" --device "$DEVICE" "$@" $QUALITY_FLAGS | tee -a "$OUT/quality/bests.txt"
  }
  pids=()  # a bare `wait` would also wait for the tee that logs this script
  start() {  # name, then flags: at once beside the others of its wave, or alone with PARALLEL=0
    if [ "$PARALLEL" = 1 ]; then quality "$@" & pids+=($!); else quality "$@"; fi
  }
  for set in $QUALITY_SETS; do
    pids=()
    case $set in
      shipped)
        # The `shakespeare` preset exactly as shipped (1200 steps), next to four variants of it, all at
        # once on the one GPU (2x1024 at 128 x 256 runs some 10 steps a second alone on an H200).
        start preset --preset shakespeare
        start dropout-0.4 --preset shakespeare --dropout 0.4 --embed-dropout 0.15
        start dropout-0.6 --preset shakespeare --dropout 0.6 --embed-dropout 0.25
        start deeper --preset shakespeare --layers 3 --hidden 768
        # shakespeare-cpu's batch (64 x 128, 4000 steps): on tiny-shakespeare more, smaller steps won on the CPU.
        start small-batch --preset shakespeare --batch-size 64 --seq-len 128 --max-steps 4000 --eval-interval 250
        ;;
      awd)
        # The new recipe: its preset, one layer more, without weight-drop (what weight-drop adds), and
        # its preset with another seed (how far two runs of one recipe lie apart).
        start awd-2x1024 --preset shakespeare-awd
        start awd-3x1024 --preset shakespeare-awd --layers 3
        start awd-no-weight-drop --preset shakespeare-awd --weight-drop 0
        start awd-seed-2 --preset shakespeare-awd --seed 1338
        ;;
      *) echo "unknown quality set: $set (shipped, awd)"; exit 2 ;;
    esac
    [ ${#pids[@]} -eq 0 ] || wait "${pids[@]}"
  done
  tar -C "$RUNS" -czf "$OUT/quality/runs.tar.gz" --exclude='*.pt' --exclude='*.bin' --exclude='*.tmp' . 2>/dev/null
  cat "$OUT/quality/bests.txt"
  exit 0
fi

# Training runs share the GPU; each is small enough that they barely slow each other.
train() {  # name, then flags
  local name=$1; shift
  train_run "$name" --device cuda --max-time "$TRAIN_SECONDS" "$@"
}
pids=()
train default-cpu-recipe --data "$DATA" --preset default & pids+=($!)
train default-gpu --data "$DATA" --preset default --max-steps 0 --batch-size 128 --seq-len 256 --dropout 0.25 & pids+=($!)
train shakespeare --data "$DATA" --preset shakespeare --max-steps 0 & pids+=($!)
train shakespeare-wide --data "$DATA" --preset shakespeare --max-steps 0 --layers 2 --hidden 1024 --dropout 0.35 --embed-dropout 0.15 & pids+=($!)
train code --data "$STDLIB/*.py" --preset default --max-steps 0 --batch-size 128 --seq-len 256 --errors replace & pids+=($!)
wait "${pids[@]}"

python3 - "$RUNS" "$OUT" <<'EOF'
# Slim checkpoints (weights, config, vocab, provenance; no optimizer) small enough to bring back.
import sys, torch
runs, out = sys.argv[1], sys.argv[2]
keep = ("format", "format_version", "model_config", "train_config", "model", "vocab", "step",
        "val_loss", "best_val_loss", "corpus")
for run, name in (("default-gpu", "default.pt"), ("code", "code.pt")):
    try:
        ck = torch.load(f"{runs}/{run}/best.pt", map_location="cpu", weights_only=False)
        torch.save({k: ck[k] for k in keep if k in ck}, f"{out}/{name}")
        print(name, "step", ck["step"], "val_loss", ck["val_loss"])
    except Exception as e:
        print(name, "not written:", e)
EOF

# onnxruntime on the GPU: the batched step with I/O binding, and engine parity against CPU.
python3 -m bench.gpu_serving --out "$OUT/serving_gpu.json" || echo "gpu_serving failed"

tar -C "$RUNS" -czf "$OUT/runs.tar.gz" --exclude='*.pt' --exclude='*.bin' --exclude='*.tmp' . 2>/dev/null
ls -la "$OUT"
