"""Time the token-level Triton proximity kernel over tile choices on this machine's GPU.

    python scripts/triton_tiles.py [--shape H,D] [--tokens 1024,4096] [--repeats 3]

Random inputs of one layer (H heads, model width D, causal softmax patterns) go through
:func:`llm_flow.engine.gpu_kernels.attention_proximity_triton` with each tile choice; every
choice's output is compared with the default's (the largest difference relative to the largest
proximity) and its median time is printed, one JSON object per (tokens, tiles). Tiles that do
not compile or run out of resources are reported as such. Needs a CUDA GPU and triton.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from llm_flow.engine import gpu_kernels

# (query block, source block, model block, warps); None: the default for the shape.
CHOICES: list[tuple[int, int, int, int] | None] = [
    None,
    (16, 8, 32, 8),
    (16, 4, 32, 4),
    (16, 8, 16, 4),
    (16, 16, 32, 8),
    (16, 4, 64, 4),
    (32, 8, 32, 4),
    (32, 8, 32, 8),
]


def layer(n_tokens: int, n_heads: int, d_model: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", generator=generator)

    scores = randn(n_heads, n_tokens, n_tokens)
    causal = torch.ones(n_tokens, n_tokens, dtype=torch.bool, device="cuda").tril()
    pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    whole = randn(n_tokens, d_model) * 3
    head_outputs = randn(n_tokens, n_heads, d_model)
    scale = torch.ones(n_tokens, device="cuda")
    return whole, pattern, head_outputs, scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="32,4096", help="heads,model width (Llama-3.1-8B)")
    parser.add_argument("--tokens", default="1024,4096")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("triton_tiles: no CUDA device")
    n_heads, d_model = (int(x) for x in args.shape.split(","))
    for n_tokens in (int(x) for x in args.tokens.split(",")):
        inputs = layer(n_tokens, n_heads, d_model)
        reference = gpu_kernels.attention_proximity_triton(*inputs)
        for tiles in CHOICES:
            row: dict[str, object] = {"tokens": n_tokens, "heads": n_heads, "d_model": d_model}
            row["tiles"] = list(tiles or gpu_kernels.token_tiles(n_heads))
            try:
                out = gpu_kernels.attention_proximity_triton(*inputs, tiles=tiles)
                torch.cuda.synchronize()
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    gpu_kernels.attention_proximity_triton(*inputs, tiles=tiles)
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - start)
            except Exception as exc:  # a choice that does not compile is a result here
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            else:
                row["ms"] = round(statistics.median(times) * 1000, 2)
                diff = (out - reference).abs().max() / reference.abs().max()
                row["max_rel_diff"] = float(diff)
            sys.stdout.write(json.dumps(row) + "\n")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
