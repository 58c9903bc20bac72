#!/usr/bin/env python3
"""transformers + PEFT's side of lora-doctor's logit comparison on a real model (issue 4's "Done when").

    /work/cache/venv/bin/python scripts/real_logits.py --base B --adapter A [--adapter2 A2] \
        [--merged-dtype bf16] [--threads 2] [--max-tokens 512] [--trained-on nf4]

Tokens: lora-doctor's built-in evaluation text (src/io/eval_text.txt) tokenized as src/io/prompts.rs does:
paragraphs split at blank lines and trimmed, each encoded with the `tokenizers` library
(`Tokenizer.from_file(tokenizer.json).encode(p, add_special_tokens=True)`; the last adapter folder's
tokenizer.json wins, else the base's), cut to min(budget, 512) ids, kept when >= 2 ids, until --max-tokens.
Every position of every sequence is scored, one sequence per forward.

Models, all run in float32 on CPU with eager attention:
  reference     base loaded in float32 + PeftModel unmerged. With --adapter2: the first adapter merged in
                float32, the second loaded on that and run unmerged (how a stack is trained).
  base          the base alone, float32.
  merge         PEFT's merge in --merged-dtype: the base loaded in that dtype, PeftModel.from_pretrained,
                merge_and_unload() (PEFT adds the delta cast to the dtype, W + round(dW), rounded again:
                lora-doctor's `--recipe peft`), then cast to float32 for the forward.
  merge_exact   the merge lora-doctor's default `exact` recipe models: base loaded in float64, PEFT's
                merge_and_unload() in float64, every parameter rounded once from float64 to the dtype
                (round-to-nearest-even on the float64 bits), then float32 for the forward.

Added tokens (issue 17): when the adapter's tokenizer has more ids than the base's embedding, every model follows
PEFT's route: resize_token_embeddings(len(tokenizer)) before PeftModel.from_pretrained (which loads the saved
resized matrices), and `base` is the reference inside disable_adapter() (the resized, untrained rows PEFT saved).

--trained-on nf4 (QLoRA): the reference's base has every decoder-block nn.Linear weight replaced by bitsandbytes'
dequant(NF4(W)) (quantize_4bit, blocksize 64, no double quant); `base` is that NF4 base (the adapter's own
effect, the denominator of effect lost) and `base_16bit` the stored base (effect plus quantization shift).

Printed as JSON on stdout: tokens, mean KL(reference || model) in nats (log_softmax in float64 of the
float32 logits, averaged over all positions) with its standard error, same-top-1 rate, effect lost
(= mean KL(ref || merge) / mean KL(ref || base)), and the reference forward's throughput in tokens/s with
--threads torch threads (best of --timing-runs timed passes over all sequences, after one warm-up).
"""
import argparse
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
EVAL_TEXT = REPO / "src" / "io" / "eval_text.txt"
MAX_LEN = 512
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16}
MANTISSA = {"bf16": 7, "f16": 10}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# tokens, as src/io/prompts.rs makes them


def split_paragraphs(text: str) -> list:
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def find_tokenizer(base: pathlib.Path, adapters: list) -> pathlib.Path:
    for a in reversed(adapters):
        if (a / "tokenizer.json").is_file():
            return a / "tokenizer.json"
    if (base / "tokenizer.json").is_file():
        return base / "tokenizer.json"
    raise SystemExit("no tokenizer.json in the adapter folders or the base folder")


def tokenize(tokenizer_path: pathlib.Path, prompts: list, max_tokens: int, max_len: int) -> list:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    sequences, budget = [], max_tokens
    for prompt in prompts:
        if budget < 2:
            break
        ids = tok.encode(prompt, add_special_tokens=True).ids[:min(budget, max_len)]
        if len(ids) >= 2:
            budget -= len(ids)
            sequences.append(ids)
    return sequences


# ------------------------------------------------------------------------------------------------
# models


def load_base(base: pathlib.Path, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype, attn_implementation="eager").eval()


def vocab_of(tok_path: pathlib.Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tok_path)).get_vocab_size(with_added_tokens=True)


def resize_for(model, vocab: int):
    """PEFT's route for added tokens: resize first; the adapter's saved matrices overwrite the new rows."""
    if vocab > model.get_input_embeddings().weight.shape[0]:
        torch.manual_seed(0)
        model.resize_token_embeddings(vocab)
    return model


@torch.no_grad()
def nf4_in_place(model):
    """Every decoder-block nn.Linear weight replaced by bitsandbytes' dequant(NF4(W)) (what QLoRA trains on)."""
    import bitsandbytes.functional as F

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            q, state = F.quantize_4bit(mod.weight.detach().float().contiguous(), blocksize=64, quant_type="nf4",
                                       compress_statistics=False)
            mod.weight.copy_(F.dequantize_4bit(q, state).to(mod.weight.dtype))
    return model


def reference_model(base, adapters, vocab: int = 0, trained_on=None):
    from peft import PeftModel

    model = resize_for(load_base(base, torch.float32), vocab)
    if trained_on == "nf4":
        nf4_in_place(model)
    for i, a in enumerate(adapters):
        model = PeftModel.from_pretrained(model, str(a))
        if i + 1 < len(adapters):
            model = model.merge_and_unload()
    return model.eval()


def merged_model(base, adapters, dtype, vocab: int = 0):
    from peft import PeftModel

    model = resize_for(load_base(base, dtype), vocab)
    for a in adapters:
        model = PeftModel.from_pretrained(model, str(a)).merge_and_unload()
    return model.eval()


def round_from_f64(x: np.ndarray, mantissa: int) -> np.ndarray:
    """float64 -> nearest value with `mantissa` stored bits (ties to even), as float32. Normal range only."""
    bits = np.ascontiguousarray(x, dtype=np.float64).view(np.uint64)
    drop = np.uint64(52 - mantissa)
    lsb = (bits >> drop) & np.uint64(1)
    bits = bits + ((np.uint64(1) << (drop - np.uint64(1))) - np.uint64(1)) + lsb
    bits = bits & ~((np.uint64(1) << drop) - np.uint64(1))
    return bits.view(np.float64).astype(np.float32)


@torch.no_grad()
def exact_model(base, adapters, name: str):
    """PEFT's merge in float64, every parameter rounded once to `name`; f16's subnormals are left to torch."""
    m64 = merged_model(base, adapters, torch.float64)
    out = load_base(base, torch.float32)
    params = dict(out.named_parameters())
    for pname, p in m64.named_parameters():
        x = p.detach().numpy()
        r = torch.from_numpy(round_from_f64(x, MANTISSA[name]))
        # Values outside the normal range of the dtype: round through torch (f16 subnormals, tiny bf16).
        small = np.abs(x) < (6.2e-5 if name == "f16" else 1.2e-38)
        if small.any():
            r[torch.from_numpy(small)] = torch.from_numpy(x[small]).to(DTYPES[name]).to(torch.float32)
        params[pname].data = r.reshape(params[pname].shape)
    del m64
    return out.eval()


@torch.no_grad()
def logits_of(model, sequences: list) -> list:
    return [model(input_ids=torch.tensor([ids])).logits[0].float().clone() for ids in sequences]


@torch.no_grad()
def scores(reference: list, candidate: list) -> dict:
    kls, same = [], []
    for r, c in zip(reference, candidate):
        for start in range(0, r.shape[0], 128):
            lr = torch.log_softmax(r[start:start + 128].double(), dim=-1)
            lc = torch.log_softmax(c[start:start + 128].double(), dim=-1)
            p = lr.exp()
            kl = torch.where(p > 0, p * (lr - lc), torch.zeros_like(p)).sum(-1).clamp_min(0.0)
            kls.extend(kl.tolist())
            same.extend((lr.argmax(-1) == lc.argmax(-1)).tolist())
    kl = np.asarray(kls)
    n = len(kl)
    return {"mean_kl": float(kl.mean()), "mean_kl_stderr": float(np.sqrt(kl.var() / max(n - 1, 1))),
            "median_kl": float(np.median(kl)), "max_kl": float(kl.max()), "same_top1": sum(same) / n}


@torch.no_grad()
def throughput(model, sequences: list, runs: int) -> dict:
    logits_of(model, sequences[:1])  # warm-up
    tokens = sum(len(s) for s in sequences)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for ids in sequences:
            model(input_ids=torch.tensor([ids]))
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"tokens": tokens, "seconds_best": best, "seconds_all": times, "tokens_per_s": tokens / best}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, type=pathlib.Path)
    ap.add_argument("--adapter", required=True, type=pathlib.Path)
    ap.add_argument("--adapter2", type=pathlib.Path, help="a second adapter stacked on the first")
    ap.add_argument("--merged-dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timing-runs", type=int, default=2)
    ap.add_argument("--no-exact", action="store_true", help="skip the float64 single-rounding merge")
    ap.add_argument("--trained-on", choices=["nf4"], help="QLoRA: the adapter trained on dequant(NF4(W))")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    adapters = [args.adapter] + ([args.adapter2] if args.adapter2 else [])
    tok_path = find_tokenizer(args.base, adapters)
    sequences = tokenize(tok_path, split_paragraphs(EVAL_TEXT.read_text()), args.max_tokens, MAX_LEN)
    n_tokens = sum(len(s) for s in sequences)
    log(f"{len(sequences)} sequences, {n_tokens} tokens ({tok_path})")

    vocab = vocab_of(tok_path)
    t0 = time.time()
    ref_model = reference_model(args.base, adapters, vocab, args.trained_on)
    reference = logits_of(ref_model, sequences)
    speed = throughput(ref_model, sequences, args.timing_runs)
    resized = reference[0].shape[-1] > load_base(args.base, torch.float32).get_input_embeddings().weight.shape[0]
    out_models = {}
    if resized:
        with ref_model.disable_adapter():
            out_models["base"] = scores(reference, logits_of(ref_model, sequences))
    del ref_model
    log(f"reference done ({time.time() - t0:.0f}s, {speed['tokens_per_s']:.0f} tokens/s)")

    base_model = load_base(args.base, torch.float32)
    base_speed = throughput(base_model, sequences, 1)
    if args.trained_on:
        out_models["base_16bit"] = scores(reference, logits_of(base_model, sequences))
        out_models["base"] = scores(reference, logits_of(nf4_in_place(base_model), sequences))
        log(f"base_16bit: KL {out_models['base_16bit']['mean_kl']:.6g}")
    elif not resized:
        out_models["base"] = scores(reference, logits_of(base_model, sequences))
    del base_model
    log(f"base: KL {out_models['base']['mean_kl']:.6g}")

    dtype = DTYPES[args.merged_dtype]
    merged = merged_model(args.base, adapters, dtype, vocab).to(torch.float32)
    out_models["merge"] = scores(reference, logits_of(merged, sequences))
    del merged
    log(f"merge ({args.merged_dtype}, PEFT): KL {out_models['merge']['mean_kl']:.6g}")
    if not args.no_exact and not resized:
        exact = exact_model(args.base, adapters, args.merged_dtype)
        out_models["merge_exact"] = scores(reference, logits_of(exact, sequences))
        del exact
        log(f"merge_exact ({args.merged_dtype}, f64 single rounding): KL {out_models['merge_exact']['mean_kl']:.6g}")

    effect = out_models["base"]["mean_kl"]
    for name in ("merge", "merge_exact"):
        if name in out_models:
            out_models[name]["effect_lost"] = out_models[name]["mean_kl"] / effect if effect > 0 else None

    import peft
    import transformers

    print(json.dumps({
        "base": str(args.base), "adapters": [str(a) for a in adapters], "tokenizer": str(tok_path),
        "merged_dtype": args.merged_dtype, "tokens": n_tokens, "sequences": [len(s) for s in sequences],
        "kl_ref_base": out_models["base"]["mean_kl"],
        "trained_on": args.trained_on,
        "kl_ref_base_16bit": out_models.get("base_16bit", {}).get("mean_kl"),
        "kl_ref_merge": out_models["merge"]["mean_kl"],
        "kl_ref_merge_exact": out_models.get("merge_exact", {}).get("mean_kl"),
        "effect_lost": out_models["merge"]["effect_lost"],
        "effect_lost_exact": out_models.get("merge_exact", {}).get("effect_lost"),
        "models": out_models,
        "throughput": {"threads": args.threads, "reference": speed, "base": base_speed},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__},
    }, indent=2))


if __name__ == "__main__":
    main()
