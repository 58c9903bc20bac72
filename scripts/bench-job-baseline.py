#!/usr/bin/env python3
"""The job a user runs today without lora-doctor, in PEFT + torch: the unmerged adapter model in f32 as the
reference, PEFT's merge_and_unload in bf16 and in f16 (each cast to f32 for its forward), and the mean
KL(reference || merge) over the same tokens lora-doctor scores. The yardstick of scripts/bench-job.sh
(issue 12 §3).

    ~/.cache/lora-doctor/venv/bin/python scripts/bench-job-baseline.py --base B --adapter A \
        [--max-tokens 512] [--threads 2] [--dtypes bf16,f16]

Tokens, models and KL come from scripts/real_logits.py (lora-doctor's built-in text, tokenized as
src/io/prompts.rs does; eager attention; KL from log_softmax in f64, row chunks of 128). Prints one JSON
line: tokens, mean KL per dtype, and the seconds of each stage.
"""
import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import real_logits as rl  # noqa: E402
import torch  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, type=pathlib.Path)
    ap.add_argument("--adapter", required=True, type=pathlib.Path)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, all cores)")
    ap.add_argument("--dtypes", default="bf16,f16")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    tok = rl.find_tokenizer(args.base, [args.adapter])
    sequences = rl.tokenize(tok, rl.split_paragraphs(rl.EVAL_TEXT.read_text()), args.max_tokens, rl.MAX_LEN)
    reference = rl.logits_of(rl.reference_model(args.base, [args.adapter]), sequences)
    stages = {"reference_s": time.perf_counter() - t0}
    kl = {}
    for name in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        t = time.perf_counter()
        model = rl.merged_model(args.base, [args.adapter], rl.DTYPES[name]).float()
        kl[name] = rl.scores(reference, rl.logits_of(model, sequences))["mean_kl"]
        del model
        stages[f"{name}_s"] = time.perf_counter() - t
    stages["total_s"] = time.perf_counter() - t0
    print(json.dumps({"tokens": sum(map(len, sequences)), "mean_kl": kl,
                      "seconds": {k: round(v, 3) for k, v in stages.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
