"""Which method to use: the report's lead, from ``results.json`` alone.

For a few quality floors (mean PSNR of at least 40, 35 and 30 dB against full compute; FID and the prompt score
within the noise of full compute) the fastest method that meets each, and whether it beats plain fewer steps
(``steps-N``) there. A number counts as within noise when it is worse than full compute's by at most the noise
of the difference (:func:`difference_noise`): the run-to-run spread where the run measured one
(``--noise-seed-sets``), else twice the standard error from this run's images (paired with full compute per prompt
where the metric has per-image values, a bootstrap over the images for FID). A metric whose noise exceeds the
spread between the methods is flagged (:func:`noise_dominated`): it cannot rank them on this many images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import median

PSNR_FLOORS = (40.0, 35.0, 30.0)


def family(name: str) -> str:
    """What a metric measures: ``"fidelity"`` (PSNR, SSIM, LPIPS: against full compute, image by image),
    ``"distribution"`` (FID, KID), ``"motion"``, or ``"prompt"`` (CLIP score or the bundled alignment score)."""
    if name in ("PSNR", "SSIM") or name.startswith("LPIPS"):
        return "fidelity"
    if name.startswith(("FID", "KID")):
        return "distribution"
    if name.startswith("motion"):
        return "motion"
    return "prompt"


def ok_trials(results: dict) -> list[dict]:
    """Trials that ran."""
    return [t for t in results["trials"] if t.get("status") == "ok"]


def full_trial(results: dict) -> dict | None:
    """The full-compute trial, if it ran."""
    return next((t for t in ok_trials(results) if t["kind"] == "full"), None)


def value(trial: dict, name: str) -> float | None:
    """A trial's value of metric ``name`` (None: not measured)."""
    return trial.get("metrics", {}).get(name, {}).get("value")


def value_noise(results: dict, trial: dict, name: str) -> float | None:
    """The noise of one trial's number as the report prints it: for a method, the noise of its difference from
    full compute (:func:`difference_noise`), which is what the decisions compare; for full compute, the
    run-to-run spread or twice its standard error, and None for a fidelity metric (it is the reference there)."""
    full = full_trial(results)
    if full is not None and trial is not full and trial["kind"] != "full":
        noise = difference_noise(results, trial, full, name)
        if noise is not None:
            return noise
    elif family(name) == "fidelity":
        return None
    measured = results.get("noise", {}).get("noise", {}).get(name) if results.get("noise") else None
    if measured is not None:
        return measured
    se = trial.get("metrics", {}).get(name, {}).get("se")
    return None if se is None else 2 * se


def needs_measured_noise(results: dict, name: str) -> bool:
    """Whether "within the noise of full compute" cannot be judged for ``name`` without the run-to-run spread: a
    distribution metric measured against full compute's own images (``paired``: full compute scores 0 by
    construction, and only other seed sets show how far an equal method lands)."""
    full = full_trial(results)
    measured = (results.get("noise") or {}).get("noise", {})
    paired = full is not None and full["metrics"].get(name, {}).get("paired", False)
    return family(name) == "distribution" and name not in measured and paired


def difference_noise(results: dict, trial: dict, full: dict, name: str) -> float | None:
    """The noise of ``trial``'s difference from full compute in metric ``name``: the run-to-run spread where
    measured; else twice the paired standard error of the per-image differences where both have per-image
    values; else twice the combined standard error; None where nothing says."""
    measured = results.get("noise", {}).get("noise", {}).get(name) if results.get("noise") else None
    if measured is not None:
        return measured
    mine, theirs = trial["metrics"].get(name, {}), full["metrics"].get(name, {})
    a, b = mine.get("per_sample"), theirs.get("per_sample")
    if a and b and len(a) == len(b) > 1:
        differences = [x - y for x, y in zip(a, b)]
        mean = sum(differences) / len(differences)
        variance = sum((d - mean) ** 2 for d in differences) / (len(differences) - 1)
        return 2 * math.sqrt(variance / len(differences))
    if mine.get("se") is not None and theirs.get("se") is not None:
        return 2 * math.hypot(mine["se"], theirs["se"])
    return None


def within_noise(results: dict, trial: dict, full: dict, name: str) -> bool:
    """Whether ``trial`` is worse than full compute in ``name`` by at most the noise (better is within); False
    where the noise is unknown."""
    noise = difference_noise(results, trial, full, name)
    mine, theirs = value(trial, name), value(full, name)
    if noise is None or mine is None or theirs is None:
        return False
    better = full["metrics"][name].get("better", "higher")
    return mine >= theirs - noise if better == "higher" else mine <= theirs + noise


def noise_dominated(results: dict, name: str) -> bool:
    """Whether the methods' differences in ``name`` are within its noise: the spread of the methods' values
    (full compute left out: it is the reference of the fidelity metrics) is at most the median noise."""
    full = full_trial(results)
    trials = [t for t in ok_trials(results) if t is not full and value(t, name) is not None]
    if full is None or len(trials) < 2:
        return False
    noises = [n for t in trials if (n := difference_noise(results, t, full, name)) is not None]
    values = [value(t, name) for t in trials]
    return bool(noises) and max(values) - min(values) <= median(noises)


@dataclass(frozen=True)
class Floor:
    """One quality floor and what meets it.

    Attributes:
        label: e.g. ``"PSNR >= 35 dB"``.
        best: the fastest trial meeting it (full compute if nothing faster does), or None.
        best_steps: the fastest plain fewer-steps trial meeting it, or None.
        has_steps: whether the run has any ``steps-N`` trial.
        reason: why the floor cannot be judged on this run (then ``best`` is None).
    """

    label: str
    best: dict | None
    best_steps: dict | None
    has_steps: bool
    reason: str = ""

    def verdict(self) -> str:
        """One sentence on fewer steps there."""
        if self.reason:
            return self.reason
        if self.best is None:
            return "nothing meets it"
        if self.best["kind"] == "full":
            return "no method is faster than full compute at this floor"
        if self.best["kind"] == "steps":
            return "plain fewer steps is the fastest here: no caching method beats it"
        if self.best_steps is not None:
            steps = self.best_steps
            return f"beats plain fewer steps ({steps['method']}: {steps['latency']['speedup']:.2f}x)"
        return "no steps-N in this run meets it" if self.has_steps else "no steps-N in this run to compare with"


def floors(results: dict) -> list[Floor]:
    """The report's quality floors with the fastest method meeting each (see the module docstring)."""
    full = full_trial(results)
    if full is None:
        return []
    trials = ok_trials(results)
    names = {t_name for t in trials for t_name in t.get("metrics", {}) if value(t, t_name) is not None}
    tests: list[tuple[str, object]] = []
    if "PSNR" in names:
        for floor in PSNR_FLOORS:
            tests.append((f"PSNR >= {floor:g} dB", lambda t, f=floor: (value(t, "PSNR") or -math.inf) >= f))
    judged = [
        next((n for n in sorted(names) if family(n) == kind and n.startswith(prefix)), None)
        for kind, prefix in (("distribution", "FID"), ("prompt", ""))
    ]
    judged = [n for n in judged if n is not None]
    for name in judged:
        tests.append((f"{name} within noise of full compute", lambda t, n=name: within_noise(results, t, full, n)))
    if len(judged) > 1:
        label = " and ".join(judged) + " both within noise"
        tests.append((label, lambda t: all(within_noise(results, t, full, n) for n in judged)))
    has_steps = any(t["kind"] == "steps" for t in trials)
    unjudged = [n for n in judged if needs_measured_noise(results, n)]
    found = []
    for label, meets in tests:
        if any(n in label for n in unjudged):
            reason = (
                f"not judged: {', '.join(unjudged)} compares with full compute's own images (0 for full compute); "
                "run with --noise-seed-sets 2 or more to measure how far other seeds of full compute land"
            )
            found.append(Floor(label, None, None, has_steps, reason))
            continue
        passing = [t for t in trials if t["kind"] == "full" or meets(t)]
        best = max(passing, key=lambda t: t["latency"]["speedup"], default=None)
        steps = [t for t in passing if t["kind"] == "steps"]
        found.append(Floor(label, best, max(steps, key=lambda t: t["latency"]["speedup"], default=None), has_steps))
    return found


def beaten_by_fewer_steps(results: dict, primary: list[str]) -> dict[str, str]:
    """Methods (not full compute, not ``steps-N``) that a plain fewer-steps trial matches: at least as fast and
    no worse in any of the ``primary`` metrics beyond the noise of the method's difference from full compute.
    Maps each such method to the fastest such ``steps-N``."""
    trials = ok_trials(results)
    steps = sorted((t for t in trials if t["kind"] == "steps"), key=lambda t: -t["latency"]["speedup"])
    found = {}
    for trial in trials:
        if trial["kind"] in ("full", "steps"):
            continue
        for other in steps:
            if other["latency"]["speedup"] >= trial["latency"]["speedup"] and all(
                _no_worse(results, other, trial, name) for name in primary
            ):
                found[trial["method"]] = other["method"]
                break
    return found


def _no_worse(results: dict, other: dict, trial: dict, name: str) -> bool:
    mine, theirs = value(trial, name), value(other, name)
    if mine is None or theirs is None:
        return True
    noise = value_noise(results, trial, name) or 0.0
    better = trial["metrics"][name].get("better", "higher")
    return theirs >= mine - noise if better == "higher" else theirs <= mine + noise
