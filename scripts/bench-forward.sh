#!/usr/bin/env bash
# Forward throughput of one model, side by side in one run (issue 12 §2): lora-doctor's f32 forward
# of SmolLM2-135M over 512 tokens (`cargo bench --bench forward`, best of RUNS) and transformers' on the same 512 token ids (token i = (7919 i + 13) mod 49152), f32,
# eager attention, best of RUNS, both at THREADS threads, in PAIRS alternating pairs (ours, then
# transformers; a shared host's load moves either side by 10-25 % between minutes). Prints tokens/s
# for each side of each pair, the ratio per pair, and the median ratio.
#
#   scripts/bench-forward.sh          # THREADS=2 RUNS=3 PAIRS=3; ${LD_CACHE:-~/.cache/lora-doctor}
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${LD_CACHE:-$HOME/.cache/lora-doctor}
MODEL=$CACHE/smollm2-135m
PY=${LD_PYTHON:-$CACHE/venv/bin/python}
THREADS=${THREADS:-2}
RUNS=${RUNS:-3}
PAIRS=${PAIRS:-3}
[ -d "$MODEL" ] || { echo "run scripts/real-model.sh first" >&2; exit 2; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

echo "== $(nproc) cores, $THREADS threads; load: $(uptime | sed 's/.*load average/load average/')"
cargo bench --quiet --bench forward --no-run 2>/dev/null
for pair in $(seq "$PAIRS"); do
LD_BENCH_ONLY=forward RAYON_NUM_THREADS=$THREADS CANDLE_NUM_THREADS=$THREADS LD_TIMING_RUNS=$RUNS LD_CACHE=$CACHE \
  cargo bench --quiet --bench forward 2>/dev/null | grep 'f32, 512 tokens' | tee -a "$tmp/ours"

"$PY" - "$MODEL" "$THREADS" "$RUNS" <<'PY' 2>/dev/null | tee -a "$tmp/torch"
import os, sys, time
os.environ["HF_HUB_OFFLINE"] = "1"
import torch
from transformers import AutoModelForCausalLM
model_dir, threads, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
ids = torch.tensor([[(i * 7919 + 13) % 49152 for i in range(512)]])
best = float("inf")
with torch.no_grad():
    model(input_ids=ids)  # warm-up
    for _ in range(runs):
        t0 = time.perf_counter()
        model(input_ids=ids)
        best = min(best, time.perf_counter() - t0)
print(f"transformers {torch.__version__} f32, 512 tokens, best of {runs}: {best:.2f} s, {512 / best:.0f} tokens/s")
PY
done
python3 - "$tmp/ours" "$tmp/torch" <<'PY'
import re, statistics, sys
ours = [float(x) for x in re.findall(r"(\d+) tokens/s", open(sys.argv[1]).read())]
theirs = [float(x) for x in re.findall(r"(\d+) tokens/s", open(sys.argv[2]).read())]
ratios = [a / b for a, b in zip(ours, theirs)]
for i, (a, b, r) in enumerate(zip(ours, theirs, ratios), 1):
    print(f"pair {i}: lora-doctor {a:.0f} tokens/s vs transformers {b:.0f} tokens/s: {r:.2f}x")
print(f"median of {len(ratios)} pairs: {statistics.median(ratios):.2f}x "
      f"(range {min(ratios):.2f}-{max(ratios):.2f}x)")
PY
echo "== load after: $(uptime | sed 's/.*load average/load average/')"
