#!/usr/bin/env python3
"""Writes a synthetic Llama checkpoint of a real model's shape, with random weights, and an r16 all-linear
LoRA adapter for it: the input of the scale benchmarks (scripts/bench-7b.sh, issue 12 §1).

    scripts/synth-llama.py --shape 7b [--out ~/.cache/lora-doctor/synth-7b] [--seed 0]
    scripts/synth-llama.py --shape 1b [--out ~/.cache/lora-doctor/synth-1b]

Shapes (bf16, untied head, vocab 32000):
  7b  Llama-2-7B: hidden 4096, 32 layers, intermediate 11008, 32 heads (MHA): 6.74 B parameters, 13.5 GB
  1b  hidden 2048, 16 layers, intermediate 8192, 32 heads / 8 kv heads: 1.1 B parameters, 2.2 GB

Output, under --out:
  base/      config.json, model-0000k-of-0000n.safetensors shards (about 2 GB each) with
             model.safetensors.index.json, and tokenizer.json
  adapter/   adapter_config.json (r 16, alpha 32, q/k/v/o/gate/up/down) and adapter_model.safetensors (f32)

Memory: the safetensors files are written tensor by tensor (header first, then each tensor's bytes as it is
drawn), so the process holds one tensor at a time (the largest, 7b's 11008 x 4096 MLP weight: 90 MB in
bf16 plus its f32 draw), never a shard or the model.

Values: weights N(0, 0.02) rounded to bf16 (round to nearest even), norms 1, LoRA A ~ N(0, 1/in) and
B ~ N(0, 0.002) so the merge changes every weight by a realistic amount. Random weights make the model's
text meaningless; the benchmark measures memory and time, not quality.

Tokenizer: a byte-level BPE trained with the `tokenizers` library on lora-doctor's built-in evaluation text
(src/io/eval_text.txt), so every id it produces is inside the 32000-token vocabulary (no download).
Needs numpy and tokenizers (the pinned venv, ~/.cache/lora-doctor/venv, has both).
"""
import argparse
import json
import os
import pathlib
import struct
import sys

import numpy as np

SHAPES = {
    "7b": dict(hidden=4096, layers=32, intermediate=11008, heads=32, kv_heads=32, vocab=32000, max_pos=4096),
    "1b": dict(hidden=2048, layers=16, intermediate=8192, heads=32, kv_heads=8, vocab=32000, max_pos=4096),
}
SHARD_BYTES = 2 * 1024**3
RANK, ALPHA = 16, 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even (finite inputs)."""
    u = x.astype(np.float32).view(np.uint32)
    u = u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    return (u >> np.uint32(16)).astype(np.uint16)


def tensor_list(s: dict):
    """(name, shape, kind) of every base tensor, in file order."""
    h, i, d = s["hidden"], s["intermediate"], s["hidden"] // s["heads"]
    kv = s["kv_heads"] * d
    out = [("model.embed_tokens.weight", (s["vocab"], h), "w")]
    for layer in range(s["layers"]):
        p = f"model.layers.{layer}"
        out += [
            (f"{p}.input_layernorm.weight", (h,), "norm"),
            (f"{p}.self_attn.q_proj.weight", (h, h), "w"),
            (f"{p}.self_attn.k_proj.weight", (kv, h), "w"),
            (f"{p}.self_attn.v_proj.weight", (kv, h), "w"),
            (f"{p}.self_attn.o_proj.weight", (h, h), "w"),
            (f"{p}.post_attention_layernorm.weight", (h,), "norm"),
            (f"{p}.mlp.gate_proj.weight", (i, h), "w"),
            (f"{p}.mlp.up_proj.weight", (i, h), "w"),
            (f"{p}.mlp.down_proj.weight", (h, i), "w"),
        ]
    out += [("model.norm.weight", (h,), "norm"), ("lm_head.weight", (s["vocab"], h), "w")]
    return out


def write_safetensors(path: pathlib.Path, entries, dtype: str, draw) -> int:
    """Writes `entries` [(name, shape)] to `path` one tensor at a time; `draw(name, shape)` returns its bytes."""
    width = {"BF16": 2, "F32": 4}[dtype]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in entries:
        n = int(np.prod(shape)) * width
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = path.with_suffix(path.suffix + ".part")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, shape in entries:
            data = draw(name, shape)
            assert len(data) == int(np.prod(shape)) * width, name
            f.write(data)
    os.replace(tmp, path)
    return offset


def tokenizer(vocab: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    text = (pathlib.Path(__file__).resolve().parent.parent / "src/io/eval_text.txt").read_text()
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text.split("\n\n"), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok.to_str()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--out", type=pathlib.Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    s = SHAPES[args.shape]
    cache = pathlib.Path(os.environ.get("LD_CACHE", pathlib.Path.home() / ".cache/lora-doctor"))
    out = args.out or cache / f"synth-{args.shape}"
    base, adapter = out / "base", out / "adapter"
    base.mkdir(parents=True, exist_ok=True)
    adapter.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)

    def draw_base(name, shape):
        if len(shape) == 1:
            return bf16_bits(np.ones(shape, np.float32)).tobytes()
        return bf16_bits(rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)).tobytes()

    # Shards of about SHARD_BYTES, tensors in order.
    shards, current, size = [], [], 0
    for name, shape, _ in tensor_list(s):
        n = int(np.prod(shape)) * 2
        if current and size + n > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += n
    shards.append(current)
    weight_map, total = {}, 0
    for k, entries in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(base / fname, entries, "BF16", draw_base)
        weight_map.update({name: fname for name, _ in entries})
        print(f"wrote {fname} ({len(entries)} tensors)", file=sys.stderr)
    (base / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": s["hidden"],
        "intermediate_size": s["intermediate"], "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"], "num_key_value_heads": s["kv_heads"], "vocab_size": s["vocab"],
        "max_position_embeddings": s["max_pos"], "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "bos_token_id": 1, "eos_token_id": 2, "attention_bias": False, "mlp_bias": False,
    }
    (base / "config.json").write_text(json.dumps(config, indent=2))
    (base / "tokenizer.json").write_text(tokenizer(s["vocab"]))

    h, i, d = s["hidden"], s["intermediate"], s["hidden"] // s["heads"]
    kv = s["kv_heads"] * d
    dims = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    entries = []
    for layer in range(s["layers"]):
        for t in TARGETS:
            group = "self_attn" if t.endswith("_proj") and t[0] in "qkvo" else "mlp"
            rows, cols = dims[t]
            p = f"base_model.model.model.layers.{layer}.{group}.{t}"
            entries += [(f"{p}.lora_A.weight", (RANK, cols)), (f"{p}.lora_B.weight", (rows, RANK))]

    def draw_lora(name, shape):
        scale = 1.0 / np.sqrt(shape[1]) if ".lora_A." in name else 0.002
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)).tobytes()

    write_safetensors(adapter / "adapter_model.safetensors", entries, "F32", draw_lora)
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.0,
        "target_modules": TARGETS, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "modules_to_save": None, "base_model_name_or_path": str(base),
    }, indent=2))
    print(f"{out}: base {total / 1e9:.2f} GB in {len(shards)} shards, adapter {len(entries)} tensors", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
