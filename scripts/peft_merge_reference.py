#!/usr/bin/env python3
"""Merge LoRA adapters into a base model with PEFT, on CPU, as the reference for `lora-doctor merge`.

    scripts/peft_merge_reference.py --base BASE --adapter A [--adapter A2 ...] --dtype bf16 --out DIR

The base is loaded with AutoModelForCausalLM.from_pretrained(BASE, dtype=D); each adapter in turn with
PeftModel.from_pretrained (autocast_adapter_dtype=True: fp32 LoRA weights) and merged with
merge_and_unload() (safe_merge=False unless --safe-merge); a second adapter is loaded on the merged model
(PEFT's sequential pipeline). DIR gets save_pretrained (safetensors), the generation config and the base's
tokenizer files. Prints the wall time of each stage. Nothing is downloaded (HF_HUB_OFFLINE=1).
"""
import argparse
import os
import pathlib
import shutil
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, type=pathlib.Path)
    ap.add_argument("--adapter", required=True, action="append", type=pathlib.Path,
                    help="PEFT adapter folder; repeat to stack (merged in the order given)")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--out", required=True, type=pathlib.Path)
    ap.add_argument("--safe-merge", action="store_true", help="merge_and_unload(safe_merge=True)")
    ap.add_argument("--max-shard-size", default="5GB")
    args = ap.parse_args()
    if args.out.exists():
        print(f"error: {args.out} exists", file=sys.stderr)
        return 2

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[args.dtype]
    t_start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(args.base), dtype=dtype)
    t_base = time.perf_counter()
    t_adapters = t_merge = 0.0
    for adapter in args.adapter:
        t0 = time.perf_counter()
        model = PeftModel.from_pretrained(model, str(adapter))
        t1 = time.perf_counter()
        model = model.merge_and_unload(safe_merge=args.safe_merge)
        t2 = time.perf_counter()
        t_adapters += t1 - t0
        t_merge += t2 - t1
    t_merged = time.perf_counter()
    tmp = args.out.with_name(args.out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=args.max_shard_size)
    for name in TOKENIZER_FILES:
        if (args.base / name).exists():
            shutil.copyfile(args.base / name, tmp / name)
    if (args.base / "generation_config.json").exists():
        shutil.copyfile(args.base / "generation_config.json", tmp / "generation_config.json")
    tmp.rename(args.out)
    t_end = time.perf_counter()

    print(f"PEFT merge_and_unload ({args.dtype}, safe_merge={args.safe_merge}, CPU, {torch.get_num_threads()} "
          f"threads, torch {torch.__version__})")
    print(f"  load base      {t_base - t_start:8.3f} s")
    print(f"  load adapters  {t_adapters:8.3f} s  ({len(args.adapter)})")
    print(f"  merge          {t_merge:8.3f} s")
    print(f"  save           {t_end - t_merged:8.3f} s")
    print(f"  load+merge     {t_merged - t_start:8.3f} s")
    print(f"  total          {t_end - t_start:8.3f} s")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
