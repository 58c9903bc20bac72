#!/usr/bin/env python3
"""Writes N small seeded PEFT LoRA adapters for one base, for `check --each` benchmarks
(scripts/bench-each.sh). Nothing is trained: lora_A and lora_B are seeded Gaussians scaled so the
update is small next to the base weights (as after fine-tuning), in the base's own dtype. One
folder per adapter, `<out>/a00 .. a<N-1>`, each with adapter_config.json and
adapter_model.safetensors, exactly the names PEFT writes.

    python scripts/make_each_adapters.py --base ~/.cache/lora-doctor/smollm2-135m \
        --out /tmp/each --count 50 --rank 4 --modules q_proj,v_proj

Needs numpy and safetensors (the pinned venv has both). The output must not exist.
"""

import argparse
import json
import os

import numpy as np
from safetensors.numpy import save_file


def module_shape(config, module):
    """(out_features, in_features) of a llama-family linear module."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads", heads) * head_dim
    inter = config["intermediate_size"]
    return {
        "q_proj": (heads * head_dim, hidden),
        "k_proj": (kv, hidden),
        "v_proj": (kv, hidden),
        "o_proj": (hidden, heads * head_dim),
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }[module]


def parent(module):
    return "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--count", type=int, default=50)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--alpha", type=int, default=8)
    ap.add_argument("--modules", default="q_proj,v_proj")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with open(os.path.join(args.base, "config.json")) as f:
        config = json.load(f)
    dtype = {"float32": np.float32, "float16": np.float16}.get(
        config.get("dtype") or config.get("torch_dtype"), np.float32
    )
    modules = args.modules.split(",")
    os.makedirs(args.out)
    rng = np.random.default_rng(args.seed)
    for n in range(args.count):
        folder = os.path.join(args.out, f"a{n:02d}")
        os.makedirs(folder)
        tensors = {}
        for layer in range(config["num_hidden_layers"]):
            for module in modules:
                rows, cols = module_shape(config, module)
                prefix = f"base_model.model.model.layers.{layer}.{parent(module)}.{module}"
                a = rng.standard_normal((args.rank, cols)) / np.sqrt(cols)
                b = rng.standard_normal((rows, args.rank)) * 0.02
                tensors[f"{prefix}.lora_A.weight"] = a.astype(dtype)
                tensors[f"{prefix}.lora_B.weight"] = b.astype(dtype)
        save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            json.dump(
                {
                    "peft_type": "LORA",
                    "task_type": "CAUSAL_LM",
                    "base_model_name_or_path": args.base,
                    "r": args.rank,
                    "lora_alpha": args.alpha,
                    "lora_dropout": 0.0,
                    "target_modules": modules,
                    "bias": "none",
                    "fan_in_fan_out": False,
                    "use_rslora": False,
                    "use_dora": False,
                    "modules_to_save": None,
                },
                f,
                indent=2,
            )
    print(f"{args.count} adapters (r={args.rank}, {','.join(modules)}) in {args.out}")


if __name__ == "__main__":
    main()
