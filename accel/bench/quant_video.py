"""The video rows of ``python -m accel.bench quant --video`` (:mod:`accel.bench.quant`).

With ``--video``, the same comparison on the bundled video model (Wan, 576 tokens per clip) follows the image
model's in the same run, on ``--video-prompts`` of the search's prompts with FORA-``--video-interval`` as the
schedule (the bundled caching front is the image model's): ``full``, ``int8-weight``, ``int8-dynamic``, ``cache``,
``cache+int8``, ``naive``, ``aware``, each with its speedup, weight memory and PSNR of the decoded frames vs full
(no FID for clips).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from tqdm import tqdm

from accel.bench.quant import SEED_SETS, method_contexts  # no cycle: quant imports this module inside run
from accel.caching.search.command import DEFAULT_PROMPTS
from accel.quant import Calibration


def run_video(args, calibration: Calibration) -> dict:
    """The video rows on the bundled video model (see the module docstring)."""
    from accel.pipelines.video import DEFAULT_VIDEO_CALL_KWARGS, load_default_video_pipeline

    pipe = load_default_video_pipeline()
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(DEFAULT_VIDEO_CALL_KWARGS)
    prompts = list(DEFAULT_PROMPTS[: args.video_prompts])
    calibration = replace(calibration, call_kwargs=kwargs)
    print(f"bundled video model, {args.steps} steps, {len(prompts)} clips, FORA-{args.video_interval}")
    return video_rows(
        pipe, prompts, steps=args.steps, call_kwargs=kwargs, batch=args.batch, repeats=args.repeats,
        calibration=calibration, min_sqnr=args.min_sqnr, interval=args.video_interval, scheme=args.scheme,
    )  # fmt: skip


def video_rows(
    pipe, prompts: list[str], *, steps: int, call_kwargs: dict, batch: int, repeats: int, calibration: Calibration,
    min_sqnr: float | None = None, interval: int = 2, seed: int = SEED_SETS[0], scheme: str = "int8-static",
) -> dict:  # fmt: skip
    """full, int8-weight, int8-dynamic (and ``scheme`` calibrated, if static), FORA-``interval`` alone, with plain
    int8-dynamic, naive (``scheme`` calibrated without the cache) and aware (calibrated under it) on a video
    pipeline: decoded clips of ``prompts`` (prompt ``i`` from seed ``seed + i``), PSNR of their frames vs full,
    speedup of one ``batch``-clip call (interleaved, fastest repeats), weight memory. Prints a table; returns
    ``{row: {"psnr", "speedup", "weight_memory_ratio"}}``."""
    from accel.caching import fora, layout_of
    from accel.eval.metrics import psnr
    from accel.eval.timing import time_interleaved

    schedule = fora(layout_of(pipe), steps, interval)
    contexts, memory, _ = method_contexts(pipe, {"": schedule}, calibration, min_sqnr, scheme)  # rows without an @

    @torch.no_grad()
    def clips(start: int, n: int) -> torch.Tensor:
        generators = [torch.Generator().manual_seed(seed + i) for i in range(start, start + n)]
        out = pipe(prompts[start : start + n], num_inference_steps=steps, generator=generators, output_type="pt",
                   **call_kwargs)  # fmt: skip
        return torch.as_tensor(out.frames).float()

    frames = {}
    for name, context in tqdm(contexts.items(), desc="video methods", unit="method"):
        with context():
            frames[name] = torch.cat([clips(i, min(batch, len(prompts) - i)) for i in range(0, len(prompts), batch)])
    timings = time_interleaved(
        {name: (lambda: clips(0, min(batch, len(prompts)))) for name in contexts}, repeats=repeats, warmup=1,
        around=contexts,
    )  # fmt: skip
    fastest_full = min(timings["full"].samples)
    rows = {}
    print(f"{'method':<14}{'speedup':>9}{'weights MB':>11}{'ratio':>7}{'PSNR':>8}")
    for name in contexts:
        rows[name] = {
            "psnr": round(float(psnr(frames[name].flatten(1), frames["full"].flatten(1), 1.0).mean()), 3),
            "speedup": round(fastest_full / min(timings[name].samples), 3),
            "weight_memory_ratio": round(memory[name] / memory["full"], 4),
        }
        row = rows[name]
        print(f"{name:<14}{row['speedup']:>8.2f}x{memory[name] / 2**20:>11.2f}{row['weight_memory_ratio']:>7.3f}"
              f"{row['psnr']:>8.2f}")  # fmt: skip
    return rows
