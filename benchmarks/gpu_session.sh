#!/bin/bash
# Everything GPU-side in one command, for a lent GPU machine with a bare image (the device tool)
# or any CUDA host:   bash benchmarks/gpu_session.sh STAGE...
# Stages: setup (wheels from .whl/ if present, build megamoe._C with CUDA), tests (GPU tests),
# dispatch, exchange, layer, profile, train (benchmarks; TRAIN_ARGS), train4 (issue 16's 4-layer,
# one-micro-batch harness; TRAIN4_ARGS), hf (the Hugging Face baselines; HF_ARGS), multigpu (pytest -m multigpu: every layout and
# resume that fits the GPUs, one process start per world size), alltoall (NCCL bandwidth and
# topology), scaling (weak scaling of EP/TP/DP with and without the overlaps; SCALING_ARGS).
# Logs go to $OUT (default ./gpu_out). NVLink multicast stays off.
set -u
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
export LC_ALL=C PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor-cache}
py=python3
for stage in "$@"; do
  t0=$(date +%s); echo "=== $stage"
  case $stage in
    setup)
      if ls .whl/*.whl >/dev/null 2>&1; then
        $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > "$OUT/pip.log" 2>&1 || { echo "pip failed"; tail "$OUT/pip.log"; exit 1; }
      fi
      $py -c "import torch; print('torch', torch.__version__, 'gpus', torch.cuda.device_count(), torch.cuda.get_device_name())"
      # a carried .gpu/_C.so is used only if it was built from these sources (.gpu/_C.sha)
      src_sha=$(cat csrc/*.h csrc/*.cpp csrc/*.cu setup.py | sha256sum | cut -c1-16)
      so=megamoe/_C.cpython-312-x86_64-linux-gnu.so
      if [ -f .gpu/_C.so ] && [ "$(cat .gpu/_C.sha 2>/dev/null)" = "$src_sha" ]; then cp .gpu/_C.so $so
      elif [ "$(cat megamoe/_C.sha 2>/dev/null)" != "$src_sha" ]; then rm -f $so; fi
      $py -c "import torch, megamoe._C as c; assert c.with_cuda, 'built without CUDA'" 2> "$OUT/import.log" || {
        echo "building megamoe._C: $(tail -1 "$OUT/import.log")"
        # the image's /opt/gcc wrapper builds an extension that segfaults: use the system compiler
        CXX=/usr/bin/g++ CC=/usr/bin/gcc TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 $py setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { echo "build failed"; tail -30 "$OUT/build.log"; exit 1; }
        echo "built megamoe._C ($src_sha)"; cp $so "$OUT/_C.so"; echo "$src_sha" | tee megamoe/_C.sha > "$OUT/_C.sha"; }
      ;;
    tests) $py -m pytest -q -p no:cacheprovider --tb=short tests/gpu tests/unit/test_dispatch.py tests/unit/test_grouped_swiglu.py > "$OUT/tests.log" 2>&1
           grep -E "passed|failed|^E |Error" "$OUT/tests.log" | tail -25 ;;
    layer) $py benchmarks/moe_layer.py > "$OUT/layer.log" 2>&1; grep -E "^ *[0-9#]|tokens" "$OUT/layer.log" ;;
    profile) $py benchmarks/moe_layer.py --profile --tokens 4096 8192 --topk 4 > "$OUT/profile.log" 2>&1; grep -E "^##|host sync|CPU time|^  " "$OUT/profile.log" | head -20 ;;
    exchange) $py benchmarks/ep_exchange.py > "$OUT/exchange.log" 2>&1; grep -E "^ *[0-9#]|Error" "$OUT/exchange.log" ;;
    dispatch) $py benchmarks/dispatch.py > "$OUT/dispatch.log" 2>&1; grep -E "^ *[a-z#]" "$OUT/dispatch.log" | grep -v -i warn ;;
    train) $py benchmarks/train_step.py ${TRAIN_ARGS:-} > "$OUT/train.log" 2>&1; grep -E "^ *(#|variant|([a-z0-9-]+ +)?(moe|dense))|Error" "$OUT/train.log" | tail -40 ;;
    train4) $py benchmarks/train_step.py --layers 4 --grad-accum 1 ${TRAIN4_ARGS:-} > "$OUT/train4.log" 2>&1
            grep -E "^ *(#|variant|([a-z0-9-]+ +)?(moe|dense))|Error" "$OUT/train4.log" | tail -40 ;;
    hf) $py benchmarks/hf_step.py ${HF_ARGS:-} > "$OUT/hf.log" 2>&1; grep -E "^ *(#|model|hf-)|Error" "$OUT/hf.log" | tail -12 ;;
    multigpu) $py -m pytest -q -s -p no:cacheprovider --tb=short -m multigpu tests/multigpu > "$OUT/multigpu.log" 2>&1
              grep -E "worst|launch of|passed|failed|^E |  [a-z0-9-]+(/[12])?: [0-9.]+ s" "$OUT/multigpu.log" | tail -70 ;;
    alltoall) n=$($py -c "import torch; print(torch.cuda.device_count())")
              for g in $(printf "%s\n" 2 "$n" | sort -nu); do [ "$g" -ge 2 ] && [ "$g" -le "$n" ] || continue
                $py -m torch.distributed.run --standalone --nproc_per_node=$g benchmarks/alltoall.py > "$OUT/alltoall$g.log" 2>&1
                grep -E "^(#|case|equal|MoE)|Error" "$OUT/alltoall$g.log" | grep -v "^#   *$"; done ;;
    scaling) $py benchmarks/scaling.py ${SCALING_ARGS:-} > "$OUT/scaling.log" 2>&1
             grep -E "^ *(#|variant|1 GPU|EP|TP|DP)|Error|error" "$OUT/scaling.log" | tail -40 ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
  echo "--- $stage: $(( $(date +%s) - t0 )) s"
done
