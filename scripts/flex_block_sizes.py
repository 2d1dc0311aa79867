"""Does FlexAttention's block size move its CPU speed against dense SDPA? A diagnostic for the kernel rows of
``python -m accel.bench sparse``.

Random ``(1, 2, tokens, 64)`` float32 inputs; a band mask ``|q - k| < 0.1 * tokens`` (about 20% of the pairs)
turned into a block mask at each block size, and a dense one (every block) at 128; compiled FlexAttention against
dense SDPA, the fastest of 5 calls each after a warm-up. Prints the block density and the fraction of the ideal
``1 / density`` speed-up reached.

    python scripts/flex_block_sizes.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention


def fastest(fn, *args, repeats: int = 5, **kwargs) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``fn(*args, **kwargs)`` after one warm-up call."""
    fn(*args, **kwargs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return min(times)


def band(width: float):
    """The mask_mod of ``|q - k| < width``."""
    return lambda b, h, q, k: (q - k).abs() < width


def main() -> None:
    torch.set_num_threads(2)
    for length in (4096, 8192):
        compiled = torch.compile(flex_attention, dynamic=False)  # one per length: 5 masks stay under dynamo's limit (8)
        query, key, value = (torch.randn(1, 2, length, 64) for _ in range(3))
        dense = fastest(F.scaled_dot_product_attention, query, key, value)
        for block, width in (
            (128, length),
            (64, 0.1 * length),
            (128, 0.1 * length),
            (256, 0.1 * length),
            (512, 0.1 * length),
        ):
            mask = create_block_mask(band(width), 1, 1, length, length, device="cpu", BLOCK_SIZE=block)
            sparse = fastest(compiled, query, key, value, block_mask=mask)
            full = 0 if mask.full_kv_num_blocks is None else mask.full_kv_num_blocks.sum().item()
            density = (mask.kv_num_blocks.sum().item() + full) / (length // block) ** 2
            print(
                f"{length} tokens  block {block:>3}  density {density:.3f}  SDPA {dense * 1e3:7.1f} ms  "
                f"flex {sparse * 1e3:7.1f} ms  of ideal {dense / sparse * density:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
