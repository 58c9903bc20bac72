#!/usr/bin/env python3
"""Train a LoRA whose own effect on the real model is small, so that a bf16 merge loses much of it.

    /work/cache/venv/bin/python scripts/train_tiny_lr_adapter.py [--lr 2e-5] [--steps 10] [--force]

Same recipe as scripts/real_model.py's smollm2-r16 (PEFT LoRA r=16, alpha=32, all-linear, AdamW, the same
instruction/answer text in windows of 128 tokens, batch 4) but a learning rate ~10x smaller and only a few
steps, so the update dW = (alpha/r) B A stays far below the bfloat16 spacing of the base weights and the
adapter's mean KL(reference || base) over lora-doctor's evaluation text is ~1e-4..1e-3 nats.

Reads   ${LD_CACHE:-~/.cache/lora-doctor}/smollm2-135m/            (scripts/real-model.sh builds it)
Writes  ${LD_CACHE:-~/.cache/lora-doctor}/adapters/smollm2-tiny-lr/ (skipped when present, unless --force)

Then measure it with scripts/real_logits.py and `lora-doctor check` (issue 4: both must report the same
`effect lost` of the bf16 merge within 10 %, and lora-doctor must raise `effect-lost`).
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

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import real_model  # noqa: E402  (the training text, windows and loop of the smollm2-r16 adapter)


def main() -> None:
    cache_default = pathlib.Path(os.environ.get("LD_CACHE") or pathlib.Path.home() / ".cache" / "lora-doctor")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=pathlib.Path, default=cache_default)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="smollm2-tiny-lr")
    ap.add_argument("--force", action="store_true", help="retrain even when the output folder exists")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = args.cache / "smollm2-135m"
    if not (base / "config.json").is_file():
        raise SystemExit(f"{base} missing: run scripts/real-model.sh first")
    out = args.cache / "adapters" / args.name
    if out.is_dir() and any(out.iterdir()) and not args.force:
        print(f"exists: {out} (--force to retrain)")
        return
    t0 = time.time()
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    pm = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0,
                                          target_modules="all-linear"))
    ids = real_model.stream(tok, real_model.chat_text(real_model.PAIRS), 4 * real_model.SEQ)
    real_model.train(pm, ids, args.steps, args.lr, args.seed, f"tiny-lr {args.lr:g}")
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    pm.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    print(f"saved {out} ({args.steps} steps at lr {args.lr:g}, {time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
