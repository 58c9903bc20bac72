#!/usr/bin/env python3
"""Time PEFT's merge_and_unload on CPU in f32, bf16 and f16, in one process, and print JSON.

    scripts/bench_peft_merge.py --base BASE --adapter A [--adapter A2 ...] [--dtypes f32,bf16,f16]

For each dtype: load the base with from_pretrained(dtype=D), load the adapter(s) with PeftModel.from_pretrained,
merge_and_unload(); each stage and the sum are timed (wall clock). Nothing is saved. peak_rss_mb is the
process's resource.getrusage(RUSAGE_SELF).ru_maxrss at the end (the peak over all three runs), the figure
to compare with `lora-doctor merge`'s peak memory.
"""
import argparse
import gc
import json
import os
import pathlib
import resource
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def run(base: pathlib.Path, adapters: list, dtype: torch.dtype) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype)
    t1 = time.perf_counter()
    load_adapter = merge = 0.0
    for a in adapters:
        ta = time.perf_counter()
        model = PeftModel.from_pretrained(model, str(a))
        tb = time.perf_counter()
        model = model.merge_and_unload()
        tc = time.perf_counter()
        load_adapter += tb - ta
        merge += tc - tb
    t2 = time.perf_counter()
    del model
    gc.collect()
    return {"load_base_s": round(t1 - t0, 4), "load_adapter_s": round(load_adapter, 4), "merge_s": round(merge, 4),
            "wall_s": round(t2 - t0, 4), "peak_rss_mb_so_far": round(rss_mb(), 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, type=pathlib.Path)
    ap.add_argument("--adapter", required=True, action="append", type=pathlib.Path)
    ap.add_argument("--dtypes", default="f32,bf16,f16")
    args = ap.parse_args()

    import peft
    import transformers
    from peft import PeftModel  # noqa: F401  (imported before the clock starts)
    from transformers import AutoModelForCausalLM  # noqa: F401

    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        print(f"error: unknown dtype(s) {bad}; use f32, bf16, f16", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    runs = {d: run(args.base, args.adapter, DTYPES[d]) for d in dtypes}
    total = time.perf_counter() - t0
    print(json.dumps({
        "tool": "peft.merge_and_unload",
        "base": str(args.base),
        "adapters": [str(a) for a in args.adapter],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "runs": runs,
        "total_s": round(total, 4),
        "sum_wall_s": round(sum(r["wall_s"] for r in runs.values()), 4),
        "peak_rss_mb": round(rss_mb(), 1),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
