"""Search caching schedules for a Pareto front of quality vs speed.

``accel search --model PATH_OR_HUB_ID --steps 20 --prompts FILE --budget 30m --out schedules/`` writes one
Schedule JSON per front member (measured metrics in ``metrics``) and ``front.json``, checkpoints every
generation (rerun the same command to resume), and with ``--report`` asks the evaluation harness for the same
report as ``accel eval``. ``--algorithm dp`` returns the dynamic-programming schedules alone, in seconds.

``--quant-scheme int8-dynamic`` (with ``--cost latency`` or ``fitted``) searches with the transformer quantized
while every candidate runs (:func:`accel.quant.search_schedules`): the front of cache + quantization, scored
against full precision; ``front.json``'s ``info["quant"]`` and every schedule's ``provenance["quant"]`` name the
scheme, since the scores hold only with it applied (``--report``, which replays in full precision, is refused).

Candidates are evaluated across processes when launched with ``accelerate launch -m accel.cli search ...``
(GPUs) or ``torchrun --nproc_per_node N -m accel.cli search ...`` (CPU processes, gloo); the result is the
same as one process's.

The flags come from :class:`SearchConfig` and its nested :class:`Constraints` and :class:`EvaluatorConfig`
(:mod:`accel.flags`): ``--seed`` is the noise seed of calibration prompt ``i`` (``seed + i``), as in ``accel eval``
and ``accel generate``; ``--search-seed`` seeds the search's own random choices.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from accel.caching.search.config import SearchConfig, parse_duration
from accel.eval.config import STEPS_DEFAULT_HELP, add_runtime_arguments, check_size, runtime_from_args
from accel.flags import add_config_arguments
from accel.flags import config_from_args as flags_config
from accel.quant.schemes import SCHEMES
from accel.textconfig import read_prompts as read_prompts_file

logger = logging.getLogger(__name__)

#: calibration prompts when no --prompts file is given: captions of the bundled model's training split
#: (emoji names), none of them among ``accel eval``'s built-in prompts, so evaluation stays held out
DEFAULT_PROMPTS = (
    "christmas tree",
    "house building",
    "rainbow",
    "blue heart",
    "umbrella",
    "birthday cake",
    "soccer ball",
    "swan",
)

#: how SearchConfig's fields become flags (accel.flags): its nested constraints and evaluation fields unprefixed,
#: and the names a flag shares with `accel eval` and `accel generate` meaning what they mean there
FLAG_OPTIONS = {
    "unprefixed": ("constraints", "evaluation"),
    "overrides": {
        "method": {"flag": "algorithm"},
        "seed": {"flag": "search-seed"},
        "evaluation.seed": {"flag": "seed", "help": "sample i is generated with seed + i"},
        "evaluation.guidance_scale": {"help": "classifier-free guidance scale; the bundled model's own: 4.0"},
        "evaluation.num_steps": {"flag": "steps", "help": f"denoising steps; {STEPS_DEFAULT_HELP}", "default": None},
        "budget_seconds": {
            "flag": "budget",
            "parse": parse_duration,
            "help": "wall-clock limit with its unit: 90s, 30m, 2h (a bare number is refused)",
        },
    },
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``accel search``: files and output, then one per :class:`SearchConfig` field (:mod:`accel.flags`)."""
    parser.add_argument("--model", help="pipeline folder or hub id; omitted: the bundled default model")
    parser.add_argument("--prompts", help="calibration prompts: a text file (one per line) or a JSON list")
    parser.add_argument("--out", required=True, help="output folder (front, schedules, checkpoint)")
    parser.add_argument("--restart", action="store_true", help="discard a checkpoint in --out instead of resuming")
    parser.add_argument("--max-sequence-length", type=int, help="text tokens (pipelines that take it)")
    parser.add_argument("--height", type=int, help="image (or clip) height in pixels; omitted: the model's")
    parser.add_argument("--width", type=int, help="image (or clip) width in pixels; omitted: the model's")
    parser.add_argument("--report", action="store_true", help="also run `accel eval` on the front and baselines")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for the run (CPU); omitted: torch's default")
    parser.add_argument(
        "--quant-scheme",
        choices=SCHEMES,
        help="search with the transformer quantized by this scheme in the loop (accel.quant); the front and its "
        "schedules are marked with it; needs --cost latency or fitted; omitted: full precision",
    )
    add_runtime_arguments(parser)
    add_config_arguments(parser, SearchConfig, **FLAG_OPTIONS)


def model_defaults(model: str | None) -> tuple[dict, dict]:
    """``(pipeline call kwargs, evaluation config defaults)`` the bundled default model needs (``model`` None)."""
    if model is not None:
        return {}, {}
    try:
        from accel.pipelines.default import DEFAULT_CALL_KWARGS, DEFAULT_GUIDANCE_SCALE
    except ImportError:
        return {}, {}
    return dict(DEFAULT_CALL_KWARGS), {"guidance_scale": DEFAULT_GUIDANCE_SCALE}


def config_from_args(args: argparse.Namespace) -> SearchConfig:
    """The :class:`SearchConfig` of the given flags (unset flags keep the defaults, or the default model's)."""
    base = {"evaluation": model_defaults(getattr(args, "model", None))[1]}
    return flags_config(args, SearchConfig, base, **FLAG_OPTIONS)


def read_prompts(path: str | None) -> list[str]:
    """Calibration prompts from a file (see :func:`accel.textconfig.read_prompts`); the built-ins if None."""
    return list(DEFAULT_PROMPTS) if path is None else list(read_prompts_file(path))


def checkpoint_progress(out: Path) -> str:
    """What the search checkpoint in ``out`` keeps, in words."""
    try:
        state = json.loads((out / "search_state.json").read_text())
        count, generation = len(state["archive_metrics"]), state["generation"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no search checkpoint was written in {out} yet"
    return f"the checkpoint in {out} keeps {count} evaluations ({generation} generations done)"


def check_quant(args: argparse.Namespace, config: SearchConfig, device: str) -> None:
    """Refuse, before any model loads, a ``--quant-scheme`` search that could not run or would mislead: a MAC cost
    (the same with int8 weights), a scheme ``device`` cannot run, or ``--report`` (it replays in full precision)."""
    scheme = getattr(args, "quant_scheme", None)
    if scheme is None:
        return
    from accel.quant import check_scheme

    if config.evaluation.cost == "macs":
        raise ValueError(
            "--quant-scheme needs a measured cost (--cost latency or fitted): MACs are the same with int8 weights"
        )
    if args.report:
        raise ValueError("--report replays the front in full precision; run it apart from a --quant-scheme search")
    try:
        check_scheme(scheme, device)
    except RuntimeError as error:
        raise ValueError(f"--quant-scheme {scheme}: {error}") from None


def quant_config(scheme: str, prompts: list[str], config: SearchConfig, call_kwargs: dict) -> Any:
    """The :class:`~accel.quant.QuantConfig` of ``--quant-scheme``: no correction; a static scheme calibrates its
    activation scales once, on the search's prompts, steps and call arguments."""
    from accel.quant import Calibration, QuantConfig
    from accel.quant.schemes import STATIC_SCHEMES

    if scheme not in STATIC_SCHEMES:
        return QuantConfig(scheme=scheme, correct=False)
    evaluation = config.evaluation
    calibration = Calibration(
        prompts=tuple(prompts),
        num_inference_steps=evaluation.num_steps,
        seed=evaluation.seed,
        call_kwargs={**call_kwargs, "guidance_scale": evaluation.guidance_scale},
    )
    return QuantConfig(scheme=scheme, correct=False, calibration=calibration)


def run(args: argparse.Namespace) -> int:
    """Load the pipeline, search (with ``--quant-scheme``, quantized), save the front (and optionally the report)."""
    import torch

    from accel.eval.method_checks import check_steps
    from accel.eval.runtime import check_output_dir, report_interrupted
    from accel.pipelines.loading import default_steps

    config = config_from_args(args)
    runtime = runtime_from_args(args)
    runtime.check()
    check_quant(args, config, runtime.device)
    prompts = read_prompts(args.prompts)
    check_output_dir(args.out)
    torch.manual_seed(config.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = check_size(args.height, args.width)
    pipe = runtime.load_pipeline(args.model)
    if getattr(args, "evaluation.num_steps", None) is None:  # the pipeline's own default
        steps = default_steps(pipe, args.model)
        config = dataclasses.replace(config, evaluation=dataclasses.replace(config.evaluation, num_steps=steps))
    check_steps(pipe, config.evaluation.num_steps, "--steps")
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    call_kwargs = model_defaults(args.model)[0]
    if args.max_sequence_length is not None:
        call_kwargs["max_sequence_length"] = args.max_sequence_length
    call_kwargs.update(size)
    info = {"model": args.model or "default", "prompts_file": args.prompts, "runtime": dataclasses.asdict(runtime)}
    try:
        front = _search(args, pipe, prompts, config, call_kwargs, info)
    except KeyboardInterrupt:
        return report_interrupted(checkpoint_progress(Path(args.out)), drop=("--restart",))
    if not len(front):  # a non-main process of a multi-process run: the main one reports
        return 0
    print(front.table())
    if args.report:
        _report(args, front, pipe, call_kwargs, runtime)
    return 0


def _search(args: argparse.Namespace, pipe, prompts: list[str], config: SearchConfig, call_kwargs: dict, info: dict):
    """The caching search, or with ``--quant-scheme`` the one with the quantized model in the loop."""
    from accel.caching.search.runner import search

    resume = not args.restart
    scheme = getattr(args, "quant_scheme", None)
    if scheme is None:
        return search(pipe, prompts, config, args.out, resume=resume, call_kwargs=call_kwargs, info=info)
    from accel.quant import search_schedules

    quant = quant_config(scheme, prompts, config, call_kwargs)
    return search_schedules(pipe, prompts, quant, config, args.out, resume=resume, call_kwargs=call_kwargs, info=info)


def _report(args: argparse.Namespace, front, pipe, call_kwargs: dict, runtime) -> None:
    """Run the evaluation harness on full compute, the heuristics and the front (when the harness exists)."""
    try:
        from accel.eval.config import build_config
        from accel.eval.harness import run_evaluation
    except ImportError as error:
        logger.warning("no report: the evaluation harness is not available (%s)", error)
        return
    out = Path(args.out)
    methods = ["full", "fora-2", "fora-3", "taylorseer-3", "delta-dit", "tgate"]
    methods += [str(out / f"schedule-{i:02d}.json") for i in range(len(front))]
    values = {
        "methods": methods,
        "steps": front.info["num_steps"],
        "prompts": front.info["prompts"],
        "pipeline_kwargs": call_kwargs,
        "runtime": dataclasses.asdict(runtime),
    }
    if args.model:
        values["model"] = args.model
    run_evaluation(build_config(values), out / "report", pipe=pipe)
    logger.info("report written to %s", out / "report")
