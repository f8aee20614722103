#!/usr/bin/env bash
# The GPU check: everything IronCore can only show on CUDA. Its steps' time limits add up to ~52 minutes on one
# GPU: a session with less device time runs the steps its issue names (GPU_CHECK_STEPS, below).
#
#   bash benchmarks/gpu_check.sh            # from the repository root, in the environment that has ironcore
#
# 1. the tests that take a device (HF parity, trainer, resume, generation) with IRONCORE_TEST_DEVICE=cuda;
# 2. `ironcore train` through the CLI on CUDA in bf16 with torch.compile (device-aware MFU in its log), and a
#    ~1B LLaMA-shaped model in bf16 (MFU, the memory plan against max_memory_allocated),
#    and under torchrun with TP=2 on nccl when the machine has two GPUs;
# 3. the model, trainer and generation benchmarks in bf16 on CUDA, against HF in the same run;
# 4. the fused Triton kernels (benchmarks/kernels.py) and the trainer's MFU with and without them.
# Issue 21's part alone, in under 10 minutes: GPU_CHECK_STEPS="tests kernels train-gpt2-torch train-gpt2-triton
# train-1b-torch train-1b-triton" (the tests step runs the kernels' tests, which take the device).
# Then one summary table. Each step has a time limit and a log under $GPU_CHECK_OUT (default $OUT, else
# runs/gpu_check); a failed step does not stop the others, and the exit status is that of the worst one.
# Without a CUDA device it stops at once with one line and exit status 2. Later GPU checks add a step here.
# Issue 34 alone, as two runs whose time limits are under 10 minutes each: GPU_CHECK_STEPS="preprocess-2048
# lora-8b-null lora-8b-nf4", then GPU_CHECK_STEPS=lora-peer; issue 35 alone: GPU_CHECK_STEPS="fsdp-1b-offload-params
# fsdp-1b-offload-none"; issue 38 alone: GPU_CHECK_STEPS="train-cli train-1b kernels".
# GPU_CHECK_STEPS="grpo generate" runs only the named steps (default: all).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT_DIR=${GPU_CHECK_OUT:-${OUT:-runs/gpu_check}}

gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null)
if [[ -z "$gpus" || "$gpus" == 0 ]]; then
  echo "gpu_check: no CUDA device visible to torch ($("$PYTHON" -c 'import torch; print("torch", torch.__version__)' 2>&1 | tail -1)); run it on a GPU machine" >&2
  exit 2
fi
mkdir -p "$OUT_DIR"
card=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0))")
echo "gpu_check: $gpus x $card; torch $("$PYTHON" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)'); logs in $OUT_DIR"

STEPS=()
step() {  # step NAME LIMIT_S COMMAND...: run it with a time limit, its output shown and kept in NAME.log
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  [[ -z "${GPU_CHECK_STEPS:-}" || " $GPU_CHECK_STEPS " == *" $name "* ]] || return 0
  echo; echo "== $name: $*"
  timeout --kill-after 10 "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
  STEPS+=("$name ${PIPESTATUS[0]} $((SECONDS - start))")
}

# (test_data_indexed.py imports megatron-core, which GPU images lack; it holds no device tests)
step tests 150 env IRONCORE_TEST_DEVICE=cuda "$PYTHON" -m pytest -m device -q -p no:cacheprovider tests \
  --ignore tests/test_data_indexed.py
step preprocess 40 "$PYTHON" -m ironcore preprocess --config configs/data/pretrain_example.yaml --no-progress
step train-cli 80 "$PYTHON" -m ironcore train --config configs/example.yaml trainer.device=cuda trainer.precision=bf16 \
  trainer.compile=true operation.train_steps=60 operation.eval_interval=30 trainer.output_dir="$OUT_DIR/run-cli" \
  utils.tracking=false
# Issue 19 on one GPU: a ~1B LLaMA-shaped model (16 x 2048, GQA 32/8, FFN 8192) in bf16 with fp32 master
# weights; its log holds the MFU per step and the memory planner against torch.cuda.max_memory_allocated.
step train-1b 150 "$PYTHON" -m ironcore train --config configs/example.yaml model=llama-tiny model.hidden_size=2048 \
  model.num_layers=16 model.num_attention_heads=32 model.num_key_value_heads=8 model.ffn_hidden_size=8192 \
  trainer.device=cuda trainer.precision=bf16 trainer.micro_batch_size=8 operation.train_steps=30 \
  operation.eval_interval=0 operation.log_interval=5 trainer.output_dir="$OUT_DIR/run-1b" utils.tracking=false
# Issues 34 and 35 inside an emulated 24 GiB card (benchmarks/within_gpu_memory.py): the ~1B model trained in
# full with FSDP and CPU offload on one GPU (a group of one), and without offload for comparison; a
# Llama-3-8B-shaped model (random weights) with LoRA and with QLoRA, SFT with recomputation. Each log holds the
# planner's bytes beside max_memory_allocated, tokens/s and MFU.
ONE_B="model=llama-tiny model.hidden_size=2048 model.num_layers=16 model.num_attention_heads=32
  model.num_key_value_heads=8 model.ffn_hidden_size=8192"
for offload in params none; do
  step "fsdp-1b-offload-$offload" 150 "$PYTHON" benchmarks/within_gpu_memory.py 24 train --config configs/example.yaml \
    $ONE_B trainer.device=cuda trainer.precision=bf16 trainer.micro_batch_size=8 trainer.data_parallel=fsdp \
    trainer.offload=$offload operation.train_steps=15 operation.eval_interval=0 operation.log_interval=5 \
    trainer.save_interval=0 trainer.output_dir="$OUT_DIR/run-fsdp-1b-$offload" utils.tracking=false
done
"$PYTHON" - "$OUT_DIR" <<'PY'  # the example data in 2,048-token sequences, for the 8B runs
import sys, yaml
out = sys.argv[1]
cfg = yaml.safe_load(open("configs/data/pretrain_example.yaml"))
cfg.update(max_seq_length=2048, output_dir=f"{out}/data-2048")
yaml.safe_dump(cfg, open(f"{out}/data-2048.yaml", "w"))
PY
step preprocess-2048 60 "$PYTHON" -m ironcore preprocess --config "$OUT_DIR/data-2048.yaml" --no-progress
for quantize in null nf4; do
  step "lora-8b-$quantize" 240 "$PYTHON" benchmarks/within_gpu_memory.py 24 train --config configs/example.yaml \
    data.config_path="$OUT_DIR/data-2048.yaml" model=llama3-8b "model.lora={rank: 16, alpha: 32, quantize_base: $quantize}" trainer.device=cuda \
    trainer.precision=bf16 trainer.activation_checkpointing=true trainer.micro_batch_size=1 \
    operation.train_steps=6 operation.eval_interval=0 operation.log_interval=2 trainer.save_interval=0 \
    trainer.output_dir="$OUT_DIR/run-lora-8b-$quantize" utils.tracking=false
done
# Issue 34's speed goal on the GPU: IronCore LoRA against HF + PEFT on qwen2.5-0.5b (the CPU benchmark's model
# and adapters), 2,048 tokens a step, both in bf16 (bf16 base, fp32 adapters, autocast), 10 interleaved pairs.
step lora-peer 150 "$PYTHON" benchmarks/lora_throughput.py --kinds --device cuda --precision bf16 --seq-len 2048 \
  --pairs 10
if (( gpus >= 2 )); then
  step train-nccl-tp2 60 "$PYTHON" -m torch.distributed.run --nproc_per_node 2 -m ironcore train --config configs/example.yaml \
    --tensor-model-parallel-size 2 trainer.precision=bf16 operation.train_steps=60 \
    trainer.output_dir="$OUT_DIR/run-tp2" utils.tracking=false
fi
step model 60 "$PYTHON" benchmarks/model_throughput.py --device cuda --precision bf16 --batch 16 --seq-len 1024
step train 150 "$PYTHON" benchmarks/train_throughput.py --device cuda --precision bf16 --micro-batch 16 \
  --seq-len 1024 --steps 10 --warmup 3 --repeat 2 --modes eager compiled --impls ironcore hf
# Generation: batch-1 latency (CUDA graphs) against the measured bandwidth floor, a 64 x 8 rollout, prefill.
step generate 300 "$PYTHON" benchmarks/generate_throughput.py --device cuda --precision bf16 --pairs 10 \
  --rollout-pairs 10
# GRPO steps/s against TRL's GRPOTrainer (needs trl): the CPU benchmark's model, then a gpt2-small shape in bf16.
step grpo 120 "$PYTHON" benchmarks/grpo_throughput.py --device cuda --pairs 10 --json "$OUT_DIR/grpo_adder.json"
step grpo-gpt2 200 "$PYTHON" benchmarks/grpo_throughput.py --device cuda --model gpt2-small --precision bf16 \
  --prompts 16 --completion-len 128 --pairs 10 --json "$OUT_DIR/grpo_gpt2.json"
# Evaluation against lm-eval's hf model (needs lm_eval): multiple choice and generation (issue 18).
step eval 240 "$PYTHON" benchmarks/eval_throughput.py --device cuda
# Issue 21: the fused kernels compiled (their tests, the sweep against torch and, when installed, Liger-Kernel),
# and the trainer's MFU with model.kernels torch and triton for gpt2-small and the ~1B LLaMA shape in bf16.
step kernels 240 "$PYTHON" benchmarks/kernels.py --device cuda --rounds 10
for kernels in torch triton; do
  step "train-gpt2-$kernels" 90 "$PYTHON" -m ironcore train --config configs/example.yaml model=gpt2-small \
    model.kernels=$kernels trainer.device=cuda trainer.precision=bf16 trainer.micro_batch_size=16 \
    operation.train_steps=30 operation.eval_interval=0 operation.log_interval=10 \
    trainer.output_dir="$OUT_DIR/run-gpt2-$kernels" utils.tracking=false
  step "train-1b-$kernels" 120 "$PYTHON" -m ironcore train --config configs/example.yaml model=llama-tiny \
    model.hidden_size=2048 model.num_layers=16 model.num_attention_heads=32 model.num_key_value_heads=8 \
    model.ffn_hidden_size=8192 model.kernels=$kernels trainer.device=cuda trainer.precision=bf16 \
    trainer.micro_batch_size=8 operation.train_steps=20 operation.eval_interval=0 operation.log_interval=5 \
    trainer.output_dir="$OUT_DIR/run-1b-$kernels" utils.tracking=false
done

worst=0
for entry in "${STEPS[@]}"; do
  read -r _ rc _ <<< "$entry"
  (( rc > worst )) && worst=$rc
done
{
  echo
  echo "== summary: $gpus x $card"
  printf '%-16s %-10s %6s  %s\n' step result seconds "what it printed last"
  for entry in "${STEPS[@]}"; do
    read -r name rc secs <<< "$entry"
    case $rc in 0) result=ok ;; 124|137) result=TIMEOUT ;; *) result="FAILED($rc)" ;; esac
    last=$(grep -v '^\s*$' "$OUT_DIR/$name.log" | tail -1 | cut -c1-100)
    printf '%-16s %-10s %6s  %s\n' "$name" "$result" "$secs" "$last"
  done
  for name in grpo grpo-gpt2; do  # the GRPO tables: from "GRPO steps/s" to the ratio line
    [[ -f "$OUT_DIR/$name.log" ]] || continue
    echo; echo "-- $name"
    sed -n '/^GRPO steps\/s/,/^IronCore \/ TRL/p' "$OUT_DIR/$name.log"
  done
  if [[ -f "$OUT_DIR/generate.log" ]]; then  # the generation figures: the limits, then each model's lines
    echo; echo "-- generate"
    grep -E '^torch |^[[:alnum:].-]+: [0-9]+ MB|^  (latency|rollout|KV cache|prefill)' "$OUT_DIR/generate.log"
  fi
  if [[ -f "$OUT_DIR/kernels.log" ]]; then  # the kernel sweep: every line from its header on
    echo; echo "-- kernels"
    sed -n '/^torch /,$p' "$OUT_DIR/kernels.log"
  fi
  for name in model train; do  # the benchmark tables themselves: header, rule and rows
    [[ -f "$OUT_DIR/$name.log" ]] || continue
    echo; echo "-- $name"
    grep -E '^torch ' "$OUT_DIR/$name.log" | head -1
    awk '/^-+$/ {rule = NR; print prev; print; next} rule && !/^\[|Loading|warn/ {print} {prev = $0}' \
      "$OUT_DIR/$name.log"
  done
} | tee "$OUT_DIR/summary.txt"
exit "$worst"
