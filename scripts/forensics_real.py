#!/usr/bin/env python3
"""Real-model merged checkpoints for `lora-doctor check --merged` forensics (run through scripts/forensics-real.sh).

Inputs (built by scripts/real-model.sh): the bf16 SmolLM2-135M base $CACHE/smollm2-135m (tied embeddings) and
the PEFT LoRA $CACHE/adapters/smollm2-r16 (r=16, alpha=32, plain scaling, all linears). Writes, under OUT
(default $CACHE/forensics):

    peft-bf16          PEFT merge_and_unload in bf16 (the clean case)                      -> no finding
    rslora-wrong-bf16  PEFT merge in bf16 with use_rslora=true in a temp adapter_config.json: scale
                       alpha/sqrt(r) = 8 instead of alpha/r = 2, so ŝ/s = sqrt(16) = 4      -> scale-mismatch
    nf4-base-bf16      every nn.Linear weight inside the decoder layers replaced by bitsandbytes
                       dequantize_4bit(quantize_4bit(W, blocksize=64, nf4, no double quant)) in bf16 (CPU),
                       then the PEFT merge in bf16 (a QLoRA merge onto the dequantized base) -> quantized-merge-base

Each folder: save_pretrained (safetensors), the base's generation_config.json and tokenizer files. A folder
that exists is skipped (outputs are written to OUT/<name>.partial, then renamed). After building, prints each
folder's size and ŝ = <M-W, dW> / <dW, dW> (float64, exact dW = alpha/r B A) with the residual
||M - W - ŝ dW|| / ||dW|| for two modules, next to the same numbers for the ideal bf16 merge round(W + dW)
(this adapter's dW is small next to bf16's spacing, so even a correct merge has ŝ < 1 and a residual of
a few tenths). Nothing is downloaded.
"""
import argparse
import json
import math
import os
import pathlib
import shutil
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
PREFIX = "base_model.model."


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def temp_adapter(tmp: pathlib.Path, src: pathlib.Path, **overrides) -> pathlib.Path:
    dest = tmp / src.name
    shutil.copytree(src, dest)
    path = dest / "adapter_config.json"
    cfg = json.loads(path.read_text())
    for k, v in overrides.items():
        if k not in cfg:
            raise SystemExit(f"{src}: adapter_config.json has no {k}")
        cfg[k] = v
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return dest


def nf4_base(model) -> dict:
    """Replace every decoder-layer nn.Linear weight by dequant(NF4(W)) in place; returns the quant settings."""
    import bitsandbytes.functional as F

    seen = set()
    n = 0
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                w = mod.weight.detach().to(torch.bfloat16).contiguous()
                q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
                mod.weight.copy_(F.dequantize_4bit(q, state).to(mod.weight.dtype))
                seen.add((str(state.dtype), state.blocksize, state.quant_type, bool(state.nested)))
                n += 1
    (dt, bs, qt, nested), = seen
    return {"linears": n, "dtype": dt, "blocksize": bs, "quant_type": qt, "double_quant": nested}


def build(name: str, out: pathlib.Path, base: pathlib.Path, adapter: pathlib.Path, prepare=None) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dest = out / name
    if dest.exists():
        log(f"{name}: exists, skipped ({dest})")
        return
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16)
    if prepare is not None:
        info = prepare(model)
        log(f"{name}: base prepared {info}")
    model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    tmp = out / (name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp), safe_serialization=True)
    for f in TOKENIZER_FILES + ("generation_config.json",):
        if (base / f).exists():
            shutil.copyfile(base / f, tmp / f)
    os.replace(tmp, dest)
    log(f"{name}: wrote {dest} in {time.time() - t0:.0f}s")


def tensor(folder: pathlib.Path, key: str) -> torch.Tensor:
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    file = json.loads(index.read_text())["weight_map"][key] if index.exists() else "model.safetensors"
    with safe_open(str(folder / file), framework="pt") as f:
        return f.get_tensor(key)


def sanity(folder: pathlib.Path, base: pathlib.Path, adapter: pathlib.Path, modules: list) -> list:
    from safetensors import safe_open

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    rows = []
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as f:
        for mod in modules:
            a = f.get_tensor(f"{PREFIX}{mod}.lora_A.weight").double()
            b = f.get_tensor(f"{PREFIX}{mod}.lora_B.weight").double()
            r = a.shape[0]
            s = cfg["lora_alpha"] / (math.sqrt(r) if cfg["use_rslora"] else r)
            d = s * (b @ a)
            w = tensor(base, mod + ".weight").double()
            m = tensor(folder, mod + ".weight").double()
            s_hat, res = fit(m, w, d)
            # the same statistics for the ideal bf16 merge round(W + dW): the rounding floor of the format
            s_floor, res_floor = fit((w + d).to(torch.bfloat16).double(), w, d)
            rows.append((mod, s_hat, res, s_floor, res_floor))
    return rows


def fit(m: torch.Tensor, w: torch.Tensor, d: torch.Tensor) -> tuple:
    diff = m - w
    dd = float((d * d).sum())
    s_hat = float((diff * d).sum()) / dd
    return s_hat, float((diff - s_hat * d).norm()) / math.sqrt(dd)


def size(p: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", required=True, type=pathlib.Path)
    ap.add_argument("--out", type=pathlib.Path, help="default: CACHE/forensics")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cache = args.cache.resolve()
    out = (args.out or cache / "forensics").resolve()
    base = cache / "smollm2-135m"
    adapter = cache / "adapters" / "smollm2-r16"
    for p in (base, adapter):
        if not p.exists():
            print(f"error: {p} missing; run scripts/real-model.sh first", file=sys.stderr)
            return 2
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    if cfg["use_rslora"] or cfg["use_dora"] or cfg["rank_pattern"] or cfg["alpha_pattern"]:
        print(f"error: {adapter} is not a plain LoRA", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="ld-forensics-real-") as tmp:
        build("peft-bf16", out, base, adapter)
        build("rslora-wrong-bf16", out, base, temp_adapter(pathlib.Path(tmp), adapter, use_rslora=True))
        build("nf4-base-bf16", out, base, adapter, prepare=nf4_base)

    layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    modules = ["model.layers.0.self_attn.q_proj", f"model.layers.{layers - 1}.mlp.down_proj"]
    expect = {"peft-bf16": "1", "rslora-wrong-bf16": "sqrt(16) = 4", "nf4-base-bf16": "~1, residual >> bf16 floor"}
    for name in ("peft-bf16", "rslora-wrong-bf16", "nf4-base-bf16"):
        folder = out / name
        print(f"{folder}  {size(folder) / 1e6:.1f} MB  (expected ŝ/s {expect[name]})")
        for mod, s_hat, res, s_floor, res_floor in sanity(folder, base, adapter, modules):
            print(f"  {mod:36s} ŝ/s {s_hat:.4f}  residual/||dW|| {res:.4f}   "
                  f"(ideal bf16 round(W+dW): ŝ {s_floor:.4f}, residual {res_floor:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
