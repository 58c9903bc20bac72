#!/usr/bin/env python3
"""Compare two merged checkpoints (lora-doctor's and PEFT's) tensor by tensor and by greedy generation.

    scripts/compare_merged.py --ours DIR1 --peft DIR2 [--prompt TEXT ...] [--tokens 32] [--json FILE]

(a) For every tensor: the fraction of elements whose bits differ and the largest distance in ULPs of the
    stored dtype (grid steps between the two values; +0 and -0 are the same point). A tensor missing on one
    side, or stored with another shape or dtype, is a failure, except an `lm_head.weight` left out by a
    checkpoint whose config ties it to the input embeddings.
(b) Both folders are loaded with AutoModelForCausalLM.from_pretrained (dtype as stored) and greedily
    generate --tokens new tokens from each prompt (three fixed ones unless --prompt is given; the chat
    template is applied when the tokenizer has one). Both texts are printed.

Exit status: 0 when fewer than 1e-3 of all elements differ, no difference exceeds 1 ULP and every generated
text is identical; 1 otherwise; 2 when the inputs cannot be read.
"""
import argparse
import json
import os
import pathlib
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

PROMPTS = [
    "What does merging a LoRA adapter into a model do?",
    "Write a Python function that returns the largest of three numbers.",
    "Give me three tips for a good night's sleep.",
]
MAX_FRACTION = 1e-3
MAX_ULP = 1
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
            torch.float64: torch.int64}


def tensor_files(folder: pathlib.Path) -> dict:
    """tensor name -> safetensors file, for a single-file or sharded checkpoint (or a .safetensors file)."""
    if folder.is_file():
        files = [folder]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors in {folder}")
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = f
    return out


def read(path: pathlib.Path, name: str) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as h:
        return h.get_tensor(name)


def tied(folder: pathlib.Path) -> bool:
    cfg = folder / "config.json"
    if not cfg.exists():
        return False
    c = json.loads(cfg.read_text())
    return bool(c.get("tie_word_embeddings", c.get("text_config", {}).get("tie_word_embeddings", True)))


def ordinals(t: torch.Tensor) -> torch.Tensor:
    """Monotonic integer position of each float on its dtype's grid (-0 and +0 both 0)."""
    bits = t.contiguous().view(INT_VIEW[t.dtype]).to(torch.int64).flatten()
    width = t.element_size() * 8
    mag = bits & ((1 << (width - 1)) - 1)
    return torch.where(bits < 0, -mag, mag)


def compare_tensor(a: torch.Tensor, b: torch.Tensor) -> dict:
    n = a.numel()
    if a.dtype not in INT_VIEW:  # integer / bool tensors: exact equality
        diff = int((a != b).sum())
        return {"numel": n, "differ": diff, "max_ulp": 0 if diff == 0 else None, "nan_mismatch": 0}
    nan_a, nan_b = torch.isnan(a).flatten(), torch.isnan(b).flatten()
    nan_mismatch = int((nan_a != nan_b).sum())
    both = ~(nan_a | nan_b)
    d = (ordinals(a) - ordinals(b)).abs()[both]
    differ = int((d > 0).sum()) + nan_mismatch
    return {"numel": n, "differ": differ, "max_ulp": int(d.max()) if d.numel() else 0, "nan_mismatch": nan_mismatch}


def compare_weights(ours: pathlib.Path, peft: pathlib.Path) -> dict:
    fo, fp = tensor_files(ours), tensor_files(peft)
    problems, rows = [], {}
    for name in sorted(set(fo) | set(fp)):
        if name not in fo or name not in fp:
            side, other = ("ours", peft) if name not in fo else ("peft", ours)
            folder = ours if name not in fo else peft
            if name.endswith("lm_head.weight") and tied(folder):
                continue  # a tied head is legitimately left out
            problems.append(f"{name}: missing in {side}")
            continue
        a, b = read(fo[name], name), read(fp[name], name)
        if a.shape != b.shape:
            problems.append(f"{name}: shape {tuple(a.shape)} (ours) vs {tuple(b.shape)} (peft)")
            continue
        if a.dtype != b.dtype:
            problems.append(f"{name}: dtype {a.dtype} (ours) vs {b.dtype} (peft); compared in {b.dtype}")
            a = a.to(b.dtype)
        rows[name] = compare_tensor(a, b) | {"dtype": str(b.dtype).replace("torch.", "")}
    total = sum(r["numel"] for r in rows.values())
    differ = sum(r["differ"] for r in rows.values())
    ulps = [r["max_ulp"] for r in rows.values()]
    max_ulp = None if any(u is None for u in ulps) else max(ulps, default=0)
    return {
        "tensors": len(rows),
        "tensors_differing": sum(r["differ"] > 0 for r in rows.values()),
        "total_elements": total,
        "differing_elements": differ,
        "differing_fraction": differ / total if total else 0.0,
        "max_ulp": max_ulp,
        "nan_mismatch": sum(r["nan_mismatch"] for r in rows.values()),
        "problems": problems,
        "per_tensor": rows,
    }


def generate(folder: pathlib.Path, tok_folder: pathlib.Path, prompts: list, tokens: int) -> list:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto")
    model.eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    texts = []
    for prompt in prompts:
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"]
        else:
            ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                 do_sample=False, num_beams=1, pad_token_id=pad)
        texts.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=False))
    del model
    return texts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ours", required=True, type=pathlib.Path)
    ap.add_argument("--peft", required=True, type=pathlib.Path)
    ap.add_argument("--prompt", action="append", help="replaces the three fixed prompts; repeatable")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--no-generate", action="store_true", help="only compare the tensors")
    ap.add_argument("--json", type=pathlib.Path, help="also write the full comparison as JSON")
    args = ap.parse_args()

    try:
        w = compare_weights(args.ours, args.peft)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    worst = sorted(w["per_tensor"].items(), key=lambda kv: (kv[1]["max_ulp"] or 0, kv[1]["differ"]), reverse=True)
    print(f"tensors: {w['tensors']} compared, {w['tensors_differing']} with differences")
    print(f"elements: {w['total_elements']} total, {w['differing_elements']} differ "
          f"(fraction {w['differing_fraction']:.3e}), max {w['max_ulp']} ulp, {w['nan_mismatch']} NaN mismatches")
    for name, r in worst[:8]:
        if r["differ"]:
            print(f"  {name}: {r['differ']}/{r['numel']} differ, max {r['max_ulp']} ulp ({r['dtype']})")
    for p in w["problems"][:10]:
        print(f"  problem: {p}")
    if len(w["problems"]) > 10:
        print(f"  ... and {len(w['problems']) - 10} more problems")
    ok_weights = (not w["problems"] and w["nan_mismatch"] == 0 and w["differing_fraction"] < MAX_FRACTION
                  and w["max_ulp"] is not None and w["max_ulp"] <= MAX_ULP)

    gen = []
    ok_text = True
    if not args.no_generate:
        prompts = args.prompt or PROMPTS
        tok_folder = args.peft if (args.peft / "tokenizer_config.json").exists() else args.ours
        ours = generate(args.ours, tok_folder, prompts, args.tokens)
        theirs = generate(args.peft, tok_folder, prompts, args.tokens)
        for prompt, a, b in zip(prompts, ours, theirs):
            same = a == b
            ok_text &= same
            gen.append({"prompt": prompt, "ours": a, "peft": b, "identical": same})
            print(f"\nprompt: {prompt!r}  -> {'identical' if same else 'DIFFERENT'}")
            print(f"  ours: {a!r}")
            print(f"  peft: {b!r}")

    ok = ok_weights and ok_text
    print(f"\nweights {'ok' if ok_weights else 'FAIL'} (fraction < {MAX_FRACTION}, every difference <= {MAX_ULP} ulp); "
          f"generation {'ok' if ok_text else 'FAIL'}{' (skipped)' if args.no_generate else ''} -> exit {0 if ok else 1}")
    if args.json:
        args.json.write_text(json.dumps({"weights": w, "generation": gen, "ok": ok}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
