"""The evaluation harness: every method on the same prompts and seeds, scored against full compute.

``run_evaluation(config, out)`` writes, under ``out``:

* ``images/<method>-<key>/<index>.png``: every generated image, named by prompt index; from a video pipeline
  every clip, as a PNG filmstrip of its frames (:mod:`accel.eval.generation`), its trial recording ``frames``;
* ``trials/<method>-<key>.json``: one finished trial (status, config as applied, metrics, latency samples,
  MACs, memory). ``key`` hashes the model's weights (their exact bytes, not a float sum that changes with the
  thread count), the method (and a JSON method's file content), the prompts, seeds, step count, guidance scale
  and pipeline arguments, so an interrupted run started again skips every finished trial and every image
  already on disk, and says why when it cannot reuse an earlier trial of a method;
* ``results.json``: the run's provenance and all trials (data first), then ``report.md`` and ``report.html``
  (and, for clips, ``animations/<method>-<key>/<index>.webp``, which the page shows and links to).

A video pipeline is told by its ``__call__`` (:func:`~accel.eval.generation.generates_video`) once loaded,
before anything is generated: then a sample is a clip, latency and MACs are per clip, and the metrics are those
that score clips (:func:`~accel.eval.metrics.metric_keys`; asking for one that does not is an error then).

Several processes (``torchrun --nproc_per_node N -m accel.cli eval ...``) split the prompts with accelerate's
``PartialState().split_between_processes``; each writes its images, and the main process scores them, times
the methods and writes the report. Timing and memory come from the main process only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from accel.eval.config import EvalConfig
from accel.eval.cost import MACS_HOW, count_macs, latency, peak_memory
from accel.eval.generation import (
    generate,
    generates_video,
    load_image_set,
    load_samples,
    pipeline_defaults,
    png_frames,
    readable_sample,
    save_sample,
    weights_checksum,
)
from accel.eval.method_checks import check_method, check_steps
from accel.eval.methods import Method, UnsupportedMethod, apply_method, parse_methods
from accel.eval.metrics import MetricInputs, MetricSuite, metric_keys
from accel.eval.noise import run_to_run_noise
from accel.eval.provenance import provenance
from accel.eval.runtime import check_model, check_output_dir
from accel.eval.trials import explain_recompute, key_material, read_trial, trial_key
from accel.pipelines.loading import execution_device
from accel.serialization import lock_folder, write_json

logger = logging.getLogger(__name__)

RESULTS_TYPE = "accel.eval.Results"
RESULTS_VERSION = 1


@dataclass
class RunContext:
    """Everything the trials of one run share."""

    config: EvalConfig
    out: Path
    pipe: Any
    state: Any  # accelerate.PartialState
    kwargs: dict
    guidance_scale: float
    model_fingerprint: dict
    reference: torch.Tensor | None = None
    suite: MetricSuite | None = None
    media: str = "image"  # or "video": the pipeline makes clips

    @property
    def is_main(self) -> bool:
        """Whether this is the process that scores, times and reports."""
        return self.state.is_main_process

    @property
    def unit(self) -> str:
        """What one prompt gives: ``"image"`` or ``"clip"``."""
        return "clip" if self.media == "video" else "image"


def _write_json(path: Path, data: dict) -> None:
    write_json(data, path, allow_nan=False)  # atomic, through a temporary file of this process's own


def _sample_paths(directory: Path, count: int) -> list[Path]:
    return [directory / f"{index:05d}.png" for index in range(count)]


def _calls(context: RunContext) -> dict:
    """The pipeline arguments the run generates with, for a method that calibrates on them (quantization)."""
    return {**context.kwargs, "guidance_scale": context.guidance_scale}


def generate_shard(context: RunContext, method: Method, directory: Path) -> str | None:
    """This process's share of the method's images (or clips), skipping those on disk; the reason if
    unsupported."""
    config = context.config
    paths = _sample_paths(directory, len(config.prompts))
    with context.state.split_between_processes(list(range(len(paths)))) as shard:
        todo = [i for i in shard if not readable_sample(paths[i])]
    batches = [todo[i : i + config.batch_size] for i in range(0, len(todo), config.batch_size)]
    if not batches:
        return None
    try:
        with apply_method(method, context.pipe, config.steps, call_kwargs=_calls(context)) as applied:
            bar = tqdm(
                batches,
                desc=f"{method.name}: {context.unit}s",
                unit="batch",
                disable=not context.state.is_local_main_process,
            )
            for batch in bar:
                applied.reset()
                prompts = [config.prompts[i] for i in batch]
                seeds = [config.seeds[i] for i in batch]
                samples = generate(context.pipe, prompts, seeds, applied.steps, context.guidance_scale, context.kwargs)
                for index, sample in zip(batch, samples):
                    save_sample(sample, paths[index])
    except UnsupportedMethod as error:
        return str(error)
    return None


def measure_cost(context: RunContext, method: Method) -> dict:
    """Latency (interleaved with full compute), MACs, peak memory and technique statistics of the method."""
    config, timing = context.config, context.config.timing
    prompts = [config.prompts[i % len(config.prompts)] for i in range(timing.batch)]
    seeds = [config.seeds[i % len(config.seeds)] for i in range(timing.batch)]

    def run(steps: int) -> torch.Tensor:
        return generate(context.pipe, prompts, seeds, steps, context.guidance_scale, context.kwargs)

    with apply_method(method, context.pipe, config.steps, True, _calls(context)) as applied:
        applied.reset()
        macs = count_macs(lambda: run(applied.steps))
        stats, applied_config, steps = applied.stats(), applied.config, applied.steps
    with apply_method(method, context.pipe, config.steps, call_kwargs=_calls(context)) as applied:
        memory = peak_memory(lambda: run(applied.steps), execution_device(context.pipe))

    @contextmanager
    def around():
        with apply_method(method, context.pipe, config.steps, call_kwargs=_calls(context)):
            yield

    baseline = None if method.kind == "full" else (lambda: run(config.steps))
    timed = latency(lambda: run(steps), around, baseline, timing, unit=context.unit)
    return {
        "config": applied_config,
        "steps": steps,
        "latency": timed,
        "macs": {"per_call": macs, f"per_{context.unit}": macs / timing.batch, "how": MACS_HOW},
        "memory": memory,
        "technique_stats": stats,
    }


def score(context: RunContext, method: Method, directory: Path, keys: list[str] | None = None) -> dict:
    """The metrics (all, or ``keys``) on the method's images or clips (all processes' shares), against full
    compute."""
    images = load_samples(_sample_paths(directory, len(context.config.prompts)))
    if method.kind == "full":
        context.reference = images
    inputs = MetricInputs(images=images, reference=context.reference, prompts=context.config.prompts)
    return context.suite.compute(inputs, keys)


def resume_trial(context: RunContext, method: Method, path: Path, directory: Path, record: dict) -> dict:
    """A trial an earlier run finished (``record``, read from ``path``); metrics asked for now but not then are
    computed from its images."""
    done = record.get("metric_keys", [])
    missing = [k for k in context.suite.keys if k not in done] if record["status"] == "ok" else []
    if record["status"] == "ok" and context.is_main:
        if method.kind == "full":
            context.reference = load_samples(_sample_paths(directory, len(context.config.prompts)))
        if missing:
            record["metrics"].update(score(context, method, directory, missing))
            record["metric_keys"] = [*record["metric_keys"], *missing]
            _write_json(path, record)
    logger.info("%s: finished in an earlier run, reused %s%s", method.name, path, f" (+ {missing})" if missing else "")
    return record


def run_trial(context: RunContext, method: Method) -> dict:
    """One method, start to finish, or its saved result if a previous run finished it."""
    key = trial_key(context, method)
    name = f"{method.slug}-{key}"
    path, directory = context.out / "trials" / f"{name}.json", context.out / "images" / name
    record = read_trial(path) if path.is_file() else None
    if record is not None:
        return resume_trial(context, method, path, directory, record)
    explain_recompute(context, method)
    reason = generate_shard(context, method, directory)
    context.state.wait_for_everyone()
    record = {"method": method.name, "kind": method.kind, "params": method.params, "key": key}
    record["key_material"] = key_material(context, method)
    if context.is_main:
        if reason is None:
            try:
                cost = measure_cost(context, method)
            except UnsupportedMethod as error:
                reason = str(error)
        if reason is not None:
            record.update(status="unsupported", reason=reason)
            logger.warning("%s: unsupported: %s", method.name, reason)
        else:
            record.update(status="ok", images=str(directory.relative_to(context.out)), **cost)
            if context.media == "video":
                record["frames"] = png_frames(directory / "00000.png")
            record.update(metrics=score(context, method, directory), metric_keys=list(context.suite.keys))
        _write_json(path, record)
    context.state.wait_for_everyone()
    return json.loads(path.read_text())


def build_context(config: EvalConfig, out: Path, pipe: Any = None) -> RunContext:
    """Load the pipeline (unless given; compiled if ``config.runtime.compile``) on this process's device and
    prepare the metrics.

    Raises:
        ValueError: the configured device is not available here (before anything is loaded); a metric that
            cannot score what the pipeline makes, or a pipeline argument it does not take (before any compute).
    """
    from accelerate import PartialState

    runtime = config.runtime
    device = runtime.check()
    if pipe is None:
        check_model(config.model)
    state = PartialState(cpu=device.type == "cpu")
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    if device.type == "cuda" and state.num_processes > 1:
        device = state.device
    from accel.pipelines.loading import default_steps, is_bundled, load_pipeline

    bundled = pipe is None and is_bundled(config.model)
    if pipe is None:
        options = {"variant": runtime.variant, "revision": runtime.revision, "offload": runtime.offload}
        pipe = load_pipeline(config.model, torch_dtype=runtime.torch_dtype, device=str(device), **options)
        runtime.compile_pipeline(pipe)
    if config.steps is None:  # the pipeline's own default, stored resolved (results and trial keys hold the number)
        config = dataclasses.replace(config, steps=default_steps(pipe, config.model if bundled else ""))
    media = "video" if generates_video(pipe) else "image"
    keys = metric_keys(config.metrics, media, type(pipe).__name__)
    kwargs, guidance = pipeline_defaults(pipe, bundled, config.call_overrides)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    fingerprint = {
        "model": config.model or "bundled-default",
        "pipeline_class": type(pipe).__name__,
        "weights": weights_checksum(pipe),
        "dtype": runtime.dtype,
        **({"compiled": True} if runtime.compile else {}),  # absent when eager: earlier runs' trial keys hold
    }
    real = load_image_set(config.real_images) if config.real_images else None
    label = config.real_images or ""  # "": the suite names the full-compute images
    if not label and media == "video":
        label = "the frames of the full-compute clips of the same prompts and seeds"
    suite = MetricSuite(keys, config.weights, real=real, real_label=label)
    context = RunContext(
        config=config,
        out=out,
        pipe=pipe,
        state=state,
        kwargs=kwargs,
        guidance_scale=guidance if config.guidance_scale is None else config.guidance_scale,
        model_fingerprint=fingerprint,
        suite=suite,
        media=media,
    )
    return context


#: metrics not computed against the full-compute image of the same seed: full compute with other seeds gives
#: their run-to-run noise
NOISE_METRICS = ("fid", "clip")


def measure_noise(context: RunContext, full: Method, full_trial: dict) -> dict | None:
    """Run-to-run noise (:func:`accel.eval.noise.run_to_run_noise`) of the :data:`NOISE_METRICS` asked for:
    their spread over full compute with the run's seeds and ``noise_seed_sets`` other seed sets (set ``k`` seeds
    prompt ``i`` with ``seed + k * len(prompts) + i``). Called on every process (they share the generation);
    None on the others, or when not asked for.
    """
    config = context.config
    keys = [k for k in context.suite.keys if k in NOISE_METRICS]
    if not config.noise_seed_sets or not keys or full_trial.get("status") != "ok":
        return None
    count = len(config.prompts)
    seeds = [config.seed + index * count for index in range(config.noise_seed_sets + 1)]
    directories = []
    for seed in seeds[1:]:
        other = dataclasses.replace(context, config=dataclasses.replace(config, seed=seed))
        directories.append(context.out / "images" / f"noise-{trial_key(other, full)}")
        generate_shard(other, full, directories[-1])
        context.state.wait_for_everyone()
    if not context.is_main:
        return None
    runs = [context.reference, *(load_samples(_sample_paths(d, count)) for d in directories)]
    values: dict[str, list[float]] = {}
    better = {}
    for images in runs:
        inputs = MetricInputs(images=images, reference=context.reference, prompts=config.prompts)
        for name, result in context.suite.compute(inputs, keys).items():
            if result["value"] is not None:
                values.setdefault(name, []).append(result["value"])
                better[name] = result["better"]
    values = {name: v for name, v in values.items() if len(v) == len(runs)}
    return {
        "seeds": seeds,
        "values": values,
        "noise": run_to_run_noise(values),
        "better": {name: better[name] for name in values},
        "how": f"spread (max - min) over full compute with {len(seeds)} seed sets, the run's own first",
    }


def run_evaluation(config: EvalConfig, out: str | Path, pipe: Any = None) -> dict | None:
    """Evaluate every method of ``config``; write trials, ``results.json``, ``report.md``, ``report.html``.

    Args:
        config: what to evaluate.
        out: output folder (created; an earlier run's finished trials there are reused).
        pipe: an already-loaded pipeline instead of ``config.model``.

    Returns:
        The results (the content of ``results.json``) on the main process, None on the others.

    Raises:
        ValueError: before any compute, in one line: an output folder that cannot be written, a model, device,
            step count or method that cannot run (every method is checked against the model first).
        accel.serialization.FolderInUse: another run is writing ``out`` (its lock is held until it ends).
    """
    from accelerate import PartialState

    methods = parse_methods(config.methods)
    device = config.runtime.check()
    if pipe is None:
        check_model(config.model)
    out = check_output_dir(out)
    main = PartialState(cpu=device.type == "cpu").is_main_process  # build_context's state: the same arguments
    with lock_folder(out, "accel eval") if main else nullcontext():
        return _run_locked(config, out, pipe, methods)


def _run_locked(config: EvalConfig, out: Path, pipe: Any, methods: list[Method]) -> dict | None:
    """:func:`run_evaluation` once ``out`` is checked and, on the main process, locked."""
    from accel.eval.report import write_reports

    context = build_context(config, out, pipe)
    config = context.config  # its steps resolved to the pipeline's default when omitted
    check_steps(context.pipe, config.steps, "--steps")
    for method in methods:  # every method checked against the model before any compute
        check_method(method, context.pipe, config.steps)
    trials = []
    bar = tqdm(methods, desc="methods", unit="method", disable=not context.is_main)
    for method in bar:
        bar.set_postfix_str(method.name)
        trials.append(run_trial(context, method))
    noise = measure_noise(context, methods[0], trials[0])
    if not context.is_main:
        return None
    results = {"type": RESULTS_TYPE, "version": RESULTS_VERSION, "run": provenance(context), "trials": trials}
    if noise is not None:
        results["noise"] = noise
    _write_json(out / "results.json", results)
    results = json.loads((out / "results.json").read_text())  # exactly what was saved (lists, not tuples)
    write_reports(results, out)
    logger.info("wrote %s, %s and %s", out / "results.json", out / "report.md", out / "report.html")
    return results
