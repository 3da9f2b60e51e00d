"""A random-weight HF checkpoint with a real model's shape, for speed runs where real weights cannot go.

    python -m experiments.random_weights experiments/configs/shapes/qwen2.5-coder-1.5b-instruct.json /tmp/q15

The shape files in ``experiments/configs/shapes/`` are ``ModelConfig.to_hf_config()`` of the registry GGUFs.
transformers initialises the weights (seeded) on the GPU when there is one and saves safetensors, so that
jaxspec and the transformers reference read the very same weights. Timing only: outputs are meaningless.
"""

from __future__ import annotations

import argparse
import json


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="an HF config.json")
    ap.add_argument("out", help="output directory")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch
    import transformers

    with open(args.config) as f:
        fields = {k: v for k, v in json.load(f).items() if k != "architectures"}
    cfg = transformers.AutoConfig.for_model(**fields)
    torch.manual_seed(args.seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, args.dtype))
    model.save_pretrained(args.out)
    print(f"saved {args.out}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters")


if __name__ == "__main__":
    main()
