#!/usr/bin/env python3
"""transformers + PEFT's side of `lora-doctor check --base model.gguf` (issue 13 §1, real check).

    python scripts/gguf_real_check.py --gguf M.gguf --adapter A [--max-tokens 256] \
        [--precisions f32,bf16,f16]

transformers loads the GGUF itself (`from_pretrained(dir, gguf_file=...)`, dequantized by gguf-py) and
its tokenizer from the same file; PEFT puts the adapter on top. Tokens: lora-doctor's built-in text
(src/io/eval_text.txt), paragraphs split at blank lines, each encoded with special tokens, cut at the
token budget, kept when >= 2 ids (as src/io/prompts.rs does). Models, float32 forward on CPU:
  reference  the GGUF base dequantized to float32 + the adapter unmerged
  base       the GGUF base alone (the adapter's own effect is KL(reference || base))
  <p>        the base loaded in dtype p, PEFT merge_and_unload() in p (lora-doctor's `--recipe peft`)
Prints JSON: for each model, mean KL(reference || model) in nats and the same-top-1 rate, plus the
token ids (so the caller can check both tools scored the same tokens).
"""
import argparse
import json
import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def load(gguf: pathlib.Path, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=dtype, attn_implementation="eager"
    ).eval()


def sequences(gguf: pathlib.Path, max_tokens: int) -> list:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    text = (REPO / "src" / "io" / "eval_text.txt").read_text()
    out, budget = [], max_tokens
    for p in [p.strip() for p in text.split("\n\n") if p.strip()]:
        if budget < 2:
            break
        ids = tok(p, add_special_tokens=True)["input_ids"][: min(budget, 512)]
        if len(ids) >= 2:
            budget -= len(ids)
            out.append(ids)
    return out


@torch.no_grad()
def logprobs(model, seqs) -> list:
    return [
        torch.log_softmax(model(torch.tensor([s])).logits[0].float().double(), dim=-1) for s in seqs
    ]


def compare(ref, other) -> dict:
    kls, same, n = 0.0, 0, 0
    for r, o in zip(ref, other):
        kls += (r.exp() * (r - o)).sum(-1).sum().item()
        same += (r.argmax(-1) == o.argmax(-1)).sum().item()
        n += r.shape[0]
    return {"mean_kl": kls / n, "same_top1": same / n}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", type=pathlib.Path, required=True)
    ap.add_argument("--adapter", type=pathlib.Path, required=True)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--precisions", default="f32,bf16,f16")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from peft import PeftModel

    seqs = sequences(args.gguf, args.max_tokens)
    base = load(args.gguf, torch.float32)
    base_lp = logprobs(base, seqs)
    ref = PeftModel.from_pretrained(base, str(args.adapter)).eval()
    ref_lp = logprobs(ref, seqs)
    del ref, base
    out = {"tokens": sum(map(len, seqs)), "ids": seqs, "base": compare(ref_lp, base_lp)}
    for p in args.precisions.split(","):
        model = PeftModel.from_pretrained(load(args.gguf, DTYPES[p]), str(args.adapter))
        merged = model.merge_and_unload().eval()
        # transformers refuses .float() on a model it loaded from GGUF; cast the tensors instead.
        for t in list(merged.parameters()) + list(merged.buffers()):
            t.data = t.data.float()
        out[p] = compare(ref_lp, logprobs(merged, seqs))
        del model, merged
    print(json.dumps(out))


if __name__ == "__main__":
    main()
