#!/usr/bin/env bash
# Issue 22: everything that has never run on a GPU, in one pass on a lent CUDA machine (one H100/H200, 16 cores).
#
#   OUT=/some/folder .ci/gpu_check.sh                  # the device run; finishes within GPU_CHECK_BUDGET (400 s)
#   GPU_CHECK_DRY=1 OUT=/tmp/out .ci/gpu_check.sh      # CPU dry run: device=cpu, tiny models and sizes (logic only)
#
# Stages, in priority order (each under `timeout`, each capped by what is left of the budget; a failing or
# timed-out stage is recorded and the script goes on):
#   env        GPU, torch, packages, git state of the tree tested
#   gen_data   (background) VOC-layout 500x375 JPEG and Cityscapes-layout 2048x1024 PNG sets for the perf runs
#   tests      the CUDA-only tests (skipped on CPU): no host sync in a step / evaluation, device jitter = loader's
#   bench_*    pspnet_bench, pointrend_bench at the recipe sizes, amp off/bf16/fp16 x channels_last, eager
#   data_bench data_bench device=cuda
#   perf_*     pspnet_perf_1p, pointrend_perf_1p on the generated data, data.cache=true, 14 workers, short;
#              bench16_* times the synthetic batch at the same batch (16) and amp for the comparison
#   smoke_*    demo on CUDA with fp16 + static loss scale 128 and with bf16 (TensorBoard panels, checkpoint),
#              TensorBoard event check, ONNX export of the CUDA checkpoint, predict on CUDA, and (guarded: one GPU)
#              2-process DDP sharing cuda:0
#   compile_*  the benches' torch.compile rows (last: slowest; a failure is an error row)
#
# Files in $OUT (at most 8): gpu_log.txt (everything), summary.txt (stage table, perf vs bench), bench.md and
# bench.json (every bench section's output combined), runs.jsonl (metrics.jsonl / eval.json of the runs),
# pytest.xml (junit). summary.txt and the bench files are rewritten after every stage, so a killed run keeps them.
#
# Uses only run.py sections and their documented keys, pytest, and seg.prepare's demo generators.
set -u -o pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
DRY=${GPU_CHECK_DRY:-0}
W=${GPU_CHECK_WORK:-/tmp/gpu_check_work}
BUDGET=${GPU_CHECK_BUDGET:-400}    # seconds for the whole script (device time is scarce: keep < 7 min)
RESERVE=12                         # kept for the final collection
GRACE=8                            # timeout -k: SIGKILL this long after SIGTERM
mkdir -p "$OUT"
if [[ -e $W && ! -e $W/.gpu_check ]]; then
    echo "GPU_CHECK_WORK=$W exists and is not a gpu_check folder; refusing to empty it" >&2
    exit 2
fi
rm -rf "$W"
mkdir -p "$W/logs" "$W/bench" "$W/runs" "$W/data"
touch "$W/.gpu_check"
: >"$OUT/gpu_log.txt"
exec > >(tee -a "$OUT/gpu_log.txt") 2>&1
TEE_PID=$!
export TORCHINDUCTOR_CACHE_DIR="$W/inductor"   # cold and private: the compile rows' first-step time is a cold one

if [[ $DRY == 1 ]]; then
    DEV=cpu
    # the demo's reduced models, so every section runs in seconds on 2 cores
    PSP_MODEL=(model.base_channels=8 model.stem_channels=8 'model.blocks=[1,1,1,1]' model.channels=32 model.aux_channels=16)
    PR_MODEL=(model.norm=bn model.stem_channels=16 model.base_channels=8 'model.blocks=[1,1,1,1]' model.fpn_channels=32
              model.head_channels=32 model.head_groups=8 model.point_fc=32 model.train_num_points=256
              model.subdivision_num_points=2048)
    PSP_BENCH=("${PSP_MODEL[@]}" bench.batch_size=2 'bench.crop_hw=[64,64]' 'bench.eval_hw=[64,86]')
    PR_BENCH=("${PR_MODEL[@]}" bench.batch_size=2 'bench.crop_hw=[64,128]' 'bench.eval_hw=[128,256]')
    BENCH_STEPS=(bench.warmup=0 bench.steps=1)
    DATA_BENCH=(bench.images=2 bench.warmup=1 bench.steps=4)
    PERF_IT=8; PERF_LOG=4; WORKERS=2; B16=2
    PSP_PERF=("${PSP_MODEL[@]}" data.batch_size=2 'data.crop_hw=[64,64]' 'data.scale=[128,96]')
    PR_PERF=("${PR_MODEL[@]}" data.batch_size=2 'data.crop_hw=[64,128]' 'data.short_edges=[64,96]' data.max_size=256)
    DEMO_IT=20; DEMO_LOG=10; DDP_IT=4
    COMPILE_CAP=45                 # Inductor's cold CPU compile takes minutes here: the dry run only starts it
    GEN=(16 2 128 256)             # VOC train images, Cityscapes parts (2 train images each), Cityscapes H W
else
    DEV=cuda
    PSP_MODEL=(); PR_MODEL=(); PSP_BENCH=(); PR_BENCH=()  # recipe models; bench sizes: [base.bench] / sections
    BENCH_STEPS=(bench.warmup=3 bench.steps=10)
    DATA_BENCH=(bench.images=4)    # 4 generated files per dataset (it writes them one by one); 3 + 40 samples
    PERF_IT=${GPU_CHECK_PERF_ITERATIONS:-80}; PERF_LOG=20; WORKERS=${GPU_CHECK_WORKERS:-14}; B16=16
    PSP_PERF=(); PR_PERF=()        # the sections' batch 16, crops 512x512 / 512x1024
    DEMO_IT=200; DEMO_LOG=50; DDP_IT=20
    COMPILE_CAP=110
    GEN=(64 8 1024 2048)
fi
PERF_AMP=${GPU_CHECK_PERF_AMP:-bf16}              # perf runs and their same-batch bench rows
COMPILE_AMP=${GPU_CHECK_COMPILE_AMP:-'["bf16"]'}  # the compile rows: one combination per model fits the budget
COMPILE_CL=${GPU_CHECK_COMPILE_CL:-'[true]'}
AMPS='["off","bf16","fp16"]'
PY=python3
RUN=($PY run.py)
FAILED=()
LAST_STATUS=

printf 'stage\tstatus\tseconds\tnote\n' >"$W/stages.tsv"
record() {  # record STAGE STATUS SECONDS NOTE
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$W/stages.tsv"
}

stage() {  # stage NAME CAP_SECONDS COMMAND...: run it under timeout, output also in $W/logs/NAME.log
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET - SECONDS - RESERVE - GRACE))
    local limit=$((cap < left ? cap : left))
    if ((limit < 10)); then
        echo "=== [$(date +%T) +${SECONDS}s] $name: SKIPPED, ${left}s of the budget left"
        record "$name" skipped 0 "no time left in the ${BUDGET}s budget"
        LAST_STATUS=skipped
        return 3
    fi
    local shown="$*"
    ((${#shown} > 400)) && shown="${shown:0:400} [...]"
    echo "=== [$(date +%T) +${SECONDS}s] $name (timeout ${limit}s): $shown"
    local begin=$SECONDS rc status
    timeout -k "$GRACE" "$limit" "$@" < /dev/null 2>&1 | tee "$W/logs/$name.log"
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout ;;
        *) status=failed ;;
    esac
    LAST_STATUS=$status
    echo "=== [$(date +%T) +${SECONDS}s] $name: $status (rc $rc, $((SECONDS - begin))s)"
    record "$name" "$status" "$((SECONDS - begin))" "rc=$rc"
    [[ $status == ok ]] || FAILED+=("$name")
    return $rc
}

# ------------------------------------------------------------------ helpers (python, no seg internals)
read -r -d '' GEN_PY <<'PY'
"""Perf data of the real sizes: VOC-layout 500x375 JPEG (seg.prepare.make_demo_voc), Cityscapes-layout 2048x1024
PNG (make_demo_cityscapes, in parallel parts of 2 images, merged as <city>_<part>_<frame>); and the demo section's
own dataset (make_demo_voc's defaults, so `run.py demo` finds it complete and does not generate it again)."""
import multiprocessing, os, shutil, sys, time
from seg import prepare

root = sys.argv[1]
voc_n, parts, cs_hw = int(sys.argv[2]), int(sys.argv[3]), (int(sys.argv[4]), int(sys.argv[5]))


def city(part):
    prepare.make_demo_cityscapes(os.path.join(root, "cs_parts", f"part{part}"), n_train=2, n_val=0, size=cs_hw,
                                 seed=100 + part)


begin = time.time()
with multiprocessing.get_context("fork").Pool(parts + 1) as pool:
    pending = pool.map_async(city, range(parts))
    demo = pool.apply_async(prepare.make_demo_voc, (os.path.join(root, "demo", "VOCdevkit", "VOC2012"),))  # the demo's
    prepare.make_demo_voc(os.path.join(root, "voc", "VOCdevkit", "VOC2012"), n_train=voc_n, n_val=4, size=(375, 500))
    pending.get()
    demo.get()
dest, moved = os.path.join(root, "cs", "cityscapes"), 0
for part in range(parts):
    folder = os.path.join(root, "cs_parts", f"part{part}")
    for path, _, names in os.walk(folder):
        for name in names:
            if name.startswith("."):  # the demo marker
                continue
            city_name, _, rest = name.split("_", 2)
            target = os.path.join(dest, os.path.relpath(path, folder), f"{city_name}_{part:06d}_{rest}")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(os.path.join(path, name), target)
            moved += name.endswith("_leftImg8bit.png")
shutil.rmtree(os.path.join(root, "cs_parts"))
print(f"generated {voc_n} VOC 500x375 JPEG train images and {moved} Cityscapes {cs_hw[1]}x{cs_hw[0]} PNG train "
      f"images in {time.time() - begin:.1f}s under {root}")
PY

read -r -d '' ENV_PY <<'PY'
import importlib, sys
import torch
print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0), "bf16", torch.cuda.is_bf16_supported(),
          "cudnn", torch.backends.cudnn.version(), "tf32 conv", torch.backends.cudnn.allow_tf32)
for name in ("numpy", "PIL", "pytest", "hypothesis", "onnx", "onnxscript", "onnxruntime", "tensorboard", "scipy"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as error:  # noqa: BLE001
        print(name, "MISSING", error)
PY

read -r -d '' TB_PY <<'PY'
"""The TensorBoard events of a training run: scalar tags and the image panels (size, bytes)."""
import sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

events = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0, "images": 0})
events.Reload()
tags = events.Tags()
print(f"{len(tags['scalars'])} scalar tags: {', '.join(sorted(tags['scalars']))}")
for tag in sorted(tags["images"]):
    last = events.Images(tag)[-1]
    print(f"image {tag}: step {last.step}, {last.width}x{last.height}, {len(last.encoded_image_string)} bytes")
if not tags["images"] or not tags["scalars"]:
    sys.exit(f"{sys.argv[1]}: no image panels or no scalars")
PY

read -r -d '' COLLECT_PY <<'PY'
"""$OUT/bench.md + bench.json (every bench output), runs.jsonl (metrics of the runs), summary.txt (stages, perf vs
bench). Rewritten after every stage; each file atomically."""
import glob, json, os, re, sys

work, out, total_s, perf_amp = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]


def write(name, text):
    with open(os.path.join(out, name + ".tmp"), "w") as handle:
        handle.write(text)
    os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))


def load(path):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


order = ["pspnet", "pointrend", "data", "pspnet_b16", "pointrend_b16", "pspnet_compile", "pointrend_compile"]
folders = sorted(glob.glob(os.path.join(work, "bench", "*")), key=lambda p: (order + [os.path.basename(p)]).index(
    os.path.basename(p)))
benches, markdown = {}, []
for folder in folders:
    name = os.path.basename(folder)
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        benches[name] = load(path)
        if os.path.exists(path[:-5] + ".md"):
            with open(path[:-5] + ".md") as handle:
                markdown.append(f"<!-- {name}: {os.path.basename(path)[:-5]}.md -->\n{handle.read()}")
if benches:
    write("bench.json", json.dumps(benches, indent=1) + "\n")
    write("bench.md", "\n\n".join(markdown) + "\n")

runs = []
for folder in sorted(glob.glob(os.path.join(work, "runs", "*"))):
    name = os.path.basename(folder)
    metrics = os.path.join(folder, "metrics.jsonl")
    if os.path.exists(metrics):
        with open(metrics) as handle:
            runs += [json.dumps({"run": name, **json.loads(line)}) for line in handle if line.strip()]
    evaluation = load(os.path.join(folder, "eval.json"))
    if evaluation:
        runs.append(json.dumps({"run": name, "eval": evaluation}))
if runs:
    write("runs.jsonl", "\n".join(runs) + "\n")

with open(os.path.join(work, "stages.tsv")) as handle:
    rows = [line.rstrip("\n").split("\t") for line in handle][1:]
lines = [f"gpu_check: {len(rows)} stages, {sum(r[1] == 'ok' for r in rows)} ok, total {total_s}s so far", ""]
lines += [f"{r[0]:<26} {r[1]:<8} {r[2]:>5}s  {r[3]}" for r in rows]


def log_text(name):
    try:
        with open(os.path.join(work, "logs", name + ".log"), errors="replace") as handle:
            return handle.read()
    except OSError:
        return ""


def bench_rate(name, amp):
    result = benches.get(name) or {}
    for row in result.get("rows", []):
        if row["amp"] == amp and not row["channels_last"] and not row["compile"] and row["status"] == "ok":
            return row["train_images_per_s"], result.get("batch_size")
    return None, None


lines += ["", f"training (perf section, generated real-size data, data.cache=true) vs synthetic batch (bench), "
          f"amp={perf_amp}, contiguous, eager:"]
for model in ("pspnet", "pointrend"):
    text = log_text(f"perf_{model}")
    done = re.findall(r"([\d.]+) images/s global", text)
    pipe = re.findall(r"input pipeline: ([\d.]+) images/s per worker.*?up to ([\d.]+) images/s", text)
    util = log_text(f"smi_perf_{model}")
    samples = [int(v) for v in re.findall(r"^\s*(\d+) %", util, re.M)]
    same, batch = bench_rate(f"{model}_b16", perf_amp)
    small, small_batch = bench_rate(model, perf_amp)
    rate = lambda value, size: f"{value:.1f} images/s (batch {size})" if value else "n/a"  # noqa: E731
    lines.append(
        f"  {model}: training {done[-1] + ' images/s' if done else 'n/a'}; input pipeline "
        f"{pipe[-1][0] + ' images/s per worker, up to ' + pipe[-1][1] if pipe else 'n/a'}; synthetic batch "
        f"{rate(same, batch)}, at the bench size {rate(small, small_batch)}; GPU utilisation during training "
        f"{'mean %.0f%% (%d samples)' % (sum(samples) / len(samples), len(samples)) if samples else 'n/a'}")
write("summary.txt", "\n".join(lines) + "\n")
PY

collect() {
    $PY -c "$COLLECT_PY" "$W" "$OUT" "$SECONDS" "$PERF_AMP" || cp "$W/stages.tsv" "$OUT/summary.txt"
}

smi_start() {  # GPU utilisation samples during a perf run, into $W/logs/smi_NAME.log
    SMI_PID=
    if [[ $DRY != 1 ]] && command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -lms 500 >"$W/logs/smi_$1.log" 2>&1 &
        SMI_PID=$!
    fi
}
smi_stop() {
    [[ -n ${SMI_PID:-} ]] && kill "$SMI_PID" 2>/dev/null && wait "$SMI_PID" 2>/dev/null
    SMI_PID=
}

# the Python API on the device: seg.load(...)(path) against the label PNGs pspnet_predict wrote (same precision:
# both follow the predict section's amp), and how far those agree with amp=off
API_PY='
import glob, os, sys
import numpy as np
from PIL import Image
import seg
checkpoint, predicted, fp32, photos, device = sys.argv[1:6]
predictor = seg.load(checkpoint, device=device)
print("api config amp:", predictor.config["amp"], "channels_last:", predictor.config["channels_last"])
same = agree = total = 0
for png in sorted(glob.glob(os.path.join(predicted, "*.png"))):
    stem = os.path.basename(png)[:-4]
    label = predictor(os.path.join(photos, stem + ".jpg"))
    written = np.asarray(Image.open(png))
    exact = np.asarray(Image.open(os.path.join(fp32, stem + ".png")))
    same += int(np.array_equal(label, written))
    agree += int((written == exact).sum()); total += exact.size
    print(stem, "api == pspnet_predict:", np.array_equal(label, written), "probabilities", predictor.probabilities(os.path.join(photos, stem + ".jpg")).shape)
print(f"api equal to predict on {same} images; predict (section default amp) vs amp=off labels agree on {100 * agree / max(total, 1):.4f}% of pixels")
sys.exit(0 if same and same == len(glob.glob(os.path.join(predicted, "*.png"))) else 1)
'

# ------------------------------------------------------------------ env
echo "=== gpu_check $(date -Is) dry=$DRY budget=${BUDGET}s work=$W out=$OUT"
git log -1 --oneline
echo "tree changes (tested as they are):"
git status --short
command -v nvidia-smi >/dev/null && timeout 20 nvidia-smi
echo "$(nproc) CPU cores"
free -g | head -n 2
stage env 30 $PY -c "$ENV_PY"
stage sections 20 "${RUN[@]}" --list

# ------------------------------------------------------------------ data for the perf runs, in the background
stage gen_data 150 $PY -c "$GEN_PY" "$W/data" "${GEN[@]}" &
GEN_PID=$!

# ------------------------------------------------------------------ 1. CUDA-only tests
stage tests 90 $PY -m pytest -q -rs -p no:cacheprovider --continue-on-collection-errors --junitxml="$OUT/pytest.xml" \
    -k "cuda or synchronises or save_atomic_stores_cpu_tensors" tests
collect

# ------------------------------------------------------------------ 2. benches, eager matrix (compile rows at the end)
stage bench_pspnet 75 "${RUN[@]}" pspnet_bench device=$DEV output_dir="$W/bench/pspnet" "bench.amp=$AMPS" \
    'bench.channels_last=[false,true]' 'bench.compile=[false]' "${BENCH_STEPS[@]}" "${PSP_BENCH[@]}"
collect
stage bench_pointrend 90 "${RUN[@]}" pointrend_bench device=$DEV output_dir="$W/bench/pointrend" "bench.amp=$AMPS" \
    'bench.channels_last=[false,true]' 'bench.compile=[false]' "${BENCH_STEPS[@]}" "${PR_BENCH[@]}"
collect
stage data_bench 60 "${RUN[@]}" data_bench device=$DEV output_dir="$W/bench/data" "${DATA_BENCH[@]}"
collect

# ------------------------------------------------------------------ 3. perf on generated real-size data
wait "$GEN_PID"
if grep -q $'^gen_data\tok' "$W/stages.tsv"; then
    smi_start perf_pspnet
    stage perf_pspnet 60 "${RUN[@]}" pspnet_perf_1p device=$DEV pretrained= data_root="$W/data/voc" \
        output_dir="$W/runs/perf_pspnet" data.cache=true data.workers=$WORKERS iterations=$PERF_IT \
        log_interval=$PERF_LOG amp=$PERF_AMP "${PSP_PERF[@]}"
    smi_stop
    collect
    smi_start perf_pointrend
    stage perf_pointrend 75 "${RUN[@]}" pointrend_perf_1p device=$DEV pretrained= data_root="$W/data/cs" \
        output_dir="$W/runs/perf_pointrend" data.cache=true data.workers=$WORKERS iterations=$PERF_IT \
        log_interval=$PERF_LOG amp=$PERF_AMP "${PR_PERF[@]}"
    smi_stop
    collect
else
    record perf_pspnet skipped 0 "gen_data failed"
    record perf_pointrend skipped 0 "gen_data failed"
    FAILED+=(perf)
fi
# the synthetic batch at the perf runs' batch and amp, for the comparison in summary.txt
stage bench16_pspnet 45 "${RUN[@]}" pspnet_bench device=$DEV output_dir="$W/bench/pspnet_b16" "${PSP_BENCH[@]}" \
    bench.batch_size=$B16 "bench.amp=[\"$PERF_AMP\"]" 'bench.channels_last=[false]' 'bench.compile=[false]' \
    bench.warmup=2 bench.steps=5
collect
stage bench16_pointrend 50 "${RUN[@]}" pointrend_bench device=$DEV output_dir="$W/bench/pointrend_b16" \
    "${PR_BENCH[@]}" bench.batch_size=$B16 "bench.amp=[\"$PERF_AMP\"]" 'bench.channels_last=[false]' \
    'bench.compile=[false]' bench.warmup=2 bench.steps=5
collect

# ------------------------------------------------------------------ 4. smoke: static fp16 scale, bf16, TensorBoard, export, DDP
DEMO=("${RUN[@]}" demo device=$DEV data_root="$W/data" iterations=$DEMO_IT log_interval=$DEMO_LOG)
stage smoke_demo_fp16_static128 45 "${DEMO[@]}" amp=fp16 loss_scale=128 output_dir="$W/runs/demo_fp16_static128"
stage smoke_demo_bf16 40 "${DEMO[@]}" amp=bf16 output_dir="$W/runs/demo_bf16"
collect
stage smoke_tensorboard 20 $PY -c "$TB_PY" "$W/runs/demo_fp16_static128/tb"
CKPT=$(ls "$W"/runs/demo_fp16_static128/iter_*.pth 2>/dev/null | tail -n 1)
[[ -n $CKPT ]] || CKPT=$(ls "$W"/runs/demo_bf16/iter_*.pth 2>/dev/null | tail -n 1)
if [[ -n $CKPT ]]; then
    stage smoke_export_onnx 45 "${RUN[@]}" pspnet_export weights="$CKPT" output="$W/runs/demo_cuda.onnx"
    stage smoke_predict 30 "${RUN[@]}" pspnet_predict weights="$CKPT" device=$DEV output="$W/runs/predict" \
        "input=$W/data/demo/VOCdevkit/VOC2012/JPEGImages/2007_00000[1-4].jpg"
    stage smoke_predict_fp32 30 "${RUN[@]}" pspnet_predict weights="$CKPT" device=$DEV amp=off \
        output="$W/runs/predict_fp32" "input=$W/data/demo/VOCdevkit/VOC2012/JPEGImages/2007_00000[1-4].jpg"
    stage smoke_api 40 $PY -c "$API_PY" "$CKPT" "$W/runs/predict" "$W/runs/predict_fp32" \
        "$W/data/demo/VOCdevkit/VOC2012/JPEGImages" $DEV
else
    record smoke_export_onnx skipped 0 "no demo checkpoint"
    record smoke_predict skipped 0 "no demo checkpoint"
    FAILED+=(smoke_export_onnx)
fi
stage smoke_accumulate 40 "${DEMO[@]}" accumulate=2 iterations=$DDP_IT log_interval=2 final_eval=false \
    save_predictions=0 output_dir="$W/runs/demo_accumulate"
# Guarded: one GPU. Plain torchrun would give rank 1 LOCAL_RANK=1 (cuda:1 does not exist); here both ranks are
# told LOCAL_RANK=0 so they share cuda:0 (NCCL may refuse two ranks on one device: then it is recorded, not fatal).
DDP_NOTE="guarded: 2 processes sharing one device"  # NCCL may refuse it ("Duplicate GPU detected")
stage ddp_2proc_shared_device 45 env NCCL_DEBUG=WARN $PY -m torch.distributed.run --standalone --nproc_per_node 2 \
    --no-python env LOCAL_RANK=0 "${DEMO[@]}" iterations=$DDP_IT log_interval=2 final_eval=false save_predictions=0 \
    output_dir="$W/runs/ddp_shared"
if [[ $LAST_STATUS == failed || $LAST_STATUS == timeout ]]; then
    unset 'FAILED[-1]'
    record ddp_note info 0 "$DDP_NOTE: $LAST_STATUS, not counted as a failure"
fi
collect

# ------------------------------------------------------------------ 2b. compile rows, last (cold Inductor compile)
stage compile_pspnet $COMPILE_CAP "${RUN[@]}" pspnet_bench device=$DEV output_dir="$W/bench/pspnet_compile" \
    "bench.amp=$COMPILE_AMP" "bench.channels_last=$COMPILE_CL" 'bench.compile=[true]' "${BENCH_STEPS[@]}" \
    "${PSP_BENCH[@]}"
collect
stage compile_pointrend $COMPILE_CAP "${RUN[@]}" pointrend_bench device=$DEV output_dir="$W/bench/pointrend_compile" \
    "bench.amp=$COMPILE_AMP" "bench.channels_last=$COMPILE_CL" 'bench.compile=[true]' "${BENCH_STEPS[@]}" \
    "${PR_BENCH[@]}"
collect

echo "=== gpu_check done in ${SECONDS}s; not ok: ${FAILED[*]:-none}"
collect
cat "$OUT/summary.txt"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null
# keep gpu_log.txt under the 16 MiB a returned file may have: its head and tail
if (($(stat -c %s "$OUT/gpu_log.txt") > 15000000)); then
    { head -c 2000000 "$OUT/gpu_log.txt"; printf '\n[... cut ...]\n'; tail -c 12000000 "$OUT/gpu_log.txt"; } \
        >"$W/log.cut" && mv "$W/log.cut" "$OUT/gpu_log.txt"
fi
((${#FAILED[@]} == 0))
