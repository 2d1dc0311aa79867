"""From ``results.json`` to words: the summary table, Pareto fronts and ``report.md``.

Everything here reads the results dict only (never the model), so a report can be rebuilt from a saved
``results.json`` with :func:`write_reports`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from accel.eval.decision import beaten_by_fewer_steps, family, floors, noise_dominated, value_noise
from accel.eval.feature_metrics import stand_in_note
from accel.eval.noise import within
from accel.eval.pareto import pareto_front

logger = logging.getLogger(__name__)


def metric_names(results: dict) -> list[str]:
    """Every metric name over the trials, in order of first appearance."""
    names: list[str] = []
    for trial in results["trials"]:
        for name in trial.get("metrics", {}):
            if name not in names:
                names.append(name)
    return names


def metric_info(results: dict, name: str) -> dict:
    """The first trial's result for ``name`` that has a value, else the first one (for ``better``, ``computed``,
    ``unavailable``)."""
    found = [t["metrics"][name] for t in results["trials"] if name in t.get("metrics", {})]
    return next((r for r in found if r.get("value") is not None), found[0] if found else {})


def sample_unit(results: dict) -> str:
    """What one prompt gave in the run: ``"image"``, or ``"clip"`` for a video pipeline."""
    return "clip" if results["run"].get("media") == "video" else "image"


def ok_trials(results: dict) -> list[dict]:
    """Trials that ran."""
    return [t for t in results["trials"] if t.get("status") == "ok"]


def measured_names(results: dict) -> list[str]:
    """The metrics some trial has a value of (a metric unavailable everywhere is left out of the tables)."""
    return [n for n in metric_names(results) if any(value_of(t, n) is not None for t in ok_trials(results))]


def value_of(trial: dict, name: str) -> float | None:
    """A trial's value of ``name``, or None."""
    return trial.get("metrics", {}).get(name, {}).get("value")


def primary_metrics(results: dict) -> list[str]:
    """One measured metric per kind (fidelity, distribution, prompt, motion), the first of each: the rest of a kind
    tells the same story (PSNR and SSIM, FID and KID)."""
    seen, names = set(), []
    for name in measured_names(results):
        if family(name) not in seen:
            seen.add(family(name))
            names.append(name)
    return names


def fronts(results: dict) -> dict[str, list[str]]:
    """Per primary metric (:func:`primary_metrics`), the Pareto front of speedup vs that metric."""
    found = {}
    for name in primary_metrics(results):
        points = [
            (t["method"], t["latency"]["speedup"], t["metrics"][name]["value"])
            for t in ok_trials(results)
            if t["metrics"].get(name, {}).get("value") is not None
        ]
        if points:
            found[name] = pareto_front(points, metric_info(results, name).get("better") == "higher")
    return found


def noise_lines(results: dict) -> list[str]:
    """Per metric with a measured run-to-run noise: the noise, its values, and the methods within it of full
    compute (worse by at most the noise); empty when the run measured none."""
    noise = results.get("noise")
    if not noise:
        return []
    lines = []
    for name, spread in noise["noise"].items():
        full, better = noise["values"][name][0], noise["better"][name]
        close = [
            t["method"]
            for t in ok_trials(results)
            if t["kind"] != "full"
            and t["metrics"].get(name, {}).get("value") is not None
            and within(t["metrics"][name]["value"], full, spread, better)
        ]
        values = ", ".join(_format_value(v) for v in noise["values"][name])
        lines.append(
            f"{name}: noise {_format_value(spread)} over {len(noise['seeds'])} full-compute seed sets ({values}); "
            f"within it of full compute: {', '.join(close) or '-'}"
        )
    return lines


def _format_value(value: float | None) -> str:
    if value is None:
        return "n/a"
    if abs(value) < 5e-5:
        return "0"  # never "-0.0000"
    if abs(value) >= 100:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.4f}"


def format_with_noise(results: dict, trial: dict, name: str) -> str:
    """``"34.90 ±0.81"``: the value and its noise (:func:`accel.eval.decision.value_noise`), or ``"n/a"``."""
    text = _format_value(value_of(trial, name))
    noise = value_noise(results, trial, name)
    if noise is None or text == "n/a":
        return text
    return f"{text} ±{noise:.0f}" if noise >= 10 else f"{text} ±{noise:.2g}"  # two significant digits


def noisy_metrics(results: dict) -> list[str]:
    """The measured metrics whose noise exceeds the differences between the methods."""
    return [name for name in measured_names(results) if noise_dominated(results, name)]


def decision_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the report's lead: per quality floor, the fastest method meeting it and how it compares
    with plain fewer steps (:func:`accel.eval.decision.floors`)."""
    header = ["quality floor", "fastest method meeting it", "speedup", "vs plain fewer steps"]
    rows, noisy = [], noisy_metrics(results)
    for floor in floors(results):
        best = floor.best
        flagged = [name for name in noisy if name in floor.label]
        label = floor.label + (f" ({', '.join(flagged)} flagged: within noise says little)" if flagged else "")
        if best is None:
            rows.append([label, "-", "-", floor.verdict()])
            continue
        quality = ", ".join(
            f"{name} {format_with_noise(results, best, name)}"
            for name in primary_metrics(results)
            if best["kind"] != "full" and value_of(best, name) is not None
        )
        method = best["method"] + (f" ({quality})" if quality else "")
        rows.append([label, method, f"{best['latency']['speedup']:.2f}x", floor.verdict()])
    return header, rows


def noise_note(results: dict) -> str:
    """What the ± of the tables means, and which metrics cannot rank the methods on this run."""
    text = (
        "±: the noise of a method's difference from full compute, which the floors compare: the run-to-run "
        "spread over full-compute seed sets where measured (--noise-seed-sets), else twice the standard error over "
        "this run's images (paired per prompt where there are per-image values; FID: a bootstrap over the images; "
        "KID: its spread over subsets). Within noise of full compute: worse by at most that noise."
    )
    beaten = beaten_by_fewer_steps(results, primary_metrics(results))
    if beaten:
        pairs = ", ".join(f"{method} (by {steps})" for method, steps in beaten.items())
        metrics = ", ".join(primary_metrics(results))
        text += f" Matched by plain fewer steps, at least as fast and no worse beyond noise in {metrics}: {pairs}."
    noisy = noisy_metrics(results)
    if noisy:
        text += (
            f" Flagged: {', '.join(noisy)}: the noise exceeds the differences between the methods, so on "
            f"{len(results['run']['seeds'])} {sample_unit(results)}s they cannot rank them."
        )
    return text


def summary_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the summary table: one row per trial, unsupported ones included; each metric with its
    noise; a metric no trial measured is left out."""
    names, unit = measured_names(results), sample_unit(results)
    noisy = set(noisy_metrics(results))
    full = next((t for t in ok_trials(results) if t["kind"] == "full"), None)
    full_macs = full["macs"][f"per_{unit}"] if full else None
    header = ["method", "steps", "speedup", f"s/{unit}", f"GMACs/{unit}", "MACs vs full", "peak MiB"]
    header += [f"{n} (flagged: noise)" if n in noisy else n for n in names]
    rows = []
    for trial in results["trials"]:
        if trial.get("status") != "ok":
            rows.append([trial["method"], "unsupported", *[""] * (len(header) - 2)])
            continue
        timing, macs = trial["latency"], trial["macs"][f"per_{unit}"]
        rows.append(
            [
                trial["method"],
                str(trial["steps"]),
                f"{timing['speedup']:.2f}x",
                f"{timing[f'per_{unit}_s']:.3f} ±{100 * timing['spread']:.0f}%",
                f"{macs / 1e9:.3f}",
                f"{macs / full_macs:.2f}" if full_macs else "n/a",
                f"{trial['memory']['peak_bytes'] / 2**20:.1f}",
                *[format_with_noise(results, trial, n) for n in names],
            ]
        )
    return header, rows


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """Aligned plain-text table (for the terminal)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(header, widths))]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def run_summary(results: dict) -> str:
    """One sentence: model, prompts (and clip length), steps, device."""
    run = results["run"]
    config = run["config"]
    clips = f" (clips of {run['frames']} frames)" if run.get("media") == "video" and run.get("frames") else ""
    return (
        f"{run['model']['model']} ({run['model']['pipeline_class']}, {run['transformer_class']}), "
        f"{len(run['seeds'])} prompts{clips} ({run['prompts_source']}), {config['steps']} steps, guidance "
        f"{run.get('guidance_scale', config['guidance_scale'])}, seeds {run['seeds'][0]}..{run['seeds'][-1]}, "
        f"on {run['device']}, "
        f"{run['num_processes']} process(es), {run['created']}"
    ) + (f". {note.rstrip('.')}" if (note := stand_in_note(results)) else "")


def markdown_report(results: dict) -> str:
    """The whole ``report.md``."""
    header, rows = summary_rows(results)
    timing = results["run"]["config"]["timing"]
    lines = [
        "# Quality vs speed",
        "",
        run_summary(results) + ".",
        "",
        "## Which method to use",
        "",
        markdown_table(*decision_rows(results)),
        "",
        noise_note(results),
        "",
        "## All methods",
        "",
        markdown_table(header, rows),
        "",
        f"Speedup: median latency of full compute / the method's, timed interleaved in one process "
        f"({timing['warmup']} warm-up, {timing['repeats']} timed rounds, batch {timing['batch']}); ± is half the "
        "range over the median. MACs: " + (ok_trials(results)[0]["macs"]["how"] if ok_trials(results) else "n/a") + ".",
        "",
        "## Pareto fronts (speedup vs quality)",
        "",
    ]
    lines += [f"- {name}: {' → '.join(front)}" for name, front in fronts(results).items()]
    if results.get("noise"):
        lines += ["", "## Run-to-run noise", "", f"{results['noise']['how']}.", ""]
        lines += [f"- {line}" for line in noise_lines(results)]
    unsupported = [t for t in results["trials"] if t.get("status") != "ok"]
    if unsupported:
        lines += ["", "## Unsupported", ""]
        lines += [f"- `{t['method']}`: {t['reason']}" for t in unsupported]
    lines += ["", "## Metrics", ""]
    for name in metric_names(results):
        info = metric_info(results, name)
        detail = f"unavailable: {info['unavailable']}" if info.get("value") is None else info["computed"]
        detail += f" ({info['note']})" if info.get("note") else ""
        lines.append(f"- **{name}** ({info.get('better', '?')} is better): {detail}")
    run = results["run"]
    memory_how = next((t["memory"]["what"] for t in ok_trials(results)), "n/a")
    lines += ["", f"Peak memory: {memory_how}.", "", "## Provenance", ""]
    lines += [f"- {key}: {value}" for key, value in run["versions"].items()]
    lines += [
        f"- model fingerprint: {run['model']}",
        f"- prompts: {run['prompts_source']} (file sha256 {run.get('prompts_file_sha256')}); "
        f"list sha256 {run['prompts_sha256']}",
        f"- pipeline call: {run['pipeline_call_kwargs']}",
    ]
    return "\n".join(lines) + "\n"


def write_reports(results: dict, out: str | Path) -> None:
    """Write ``report.md`` and ``report.html`` next to ``results.json`` (and a video run's animations, see
    :func:`accel.eval.html.write_animations`)."""
    from accel.eval.html import html_report, write_animations

    out = Path(out)
    write_animations(results, out)
    (out / "report.md").write_text(markdown_report(results))
    (out / "report.html").write_text(html_report(results, out))
