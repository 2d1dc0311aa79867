"""The methods the harness compares, named by a small grammar, in one registry.

=========================  =====================================================================================
form                       meaning
=========================  =====================================================================================
``full``                   every step computed: the reference all fidelity metrics compare against
``steps-N``                ``N`` denoising steps, no caching (the cheap baseline every caching method must beat)
``fora-N``                 FORA: recompute every ``N`` steps, reuse block residuals in between
``taylorseer-N``           TaylorSeer: FORA-N with the reused residuals forecast to first order
``delta-dit``              Delta-DiT (refresh interval 2); ``delta-dit-N`` sets the interval
``tgate`` / ``tgate-K``    T-GATE: cross-attention frozen from step ``K`` (default 40% of the steps)
``fbc-T``                  accel's per-sample first-block-residual policy with threshold ``T`` (e.g. ``fbc-0.08``)
``tokens-B``               per-token step allocation computing the fraction ``B`` of the token-steps (``tokens-0.5``)
``SCHEME``                 quantization alone: ``int8-weight``, ``int8-dynamic``, ``int8-static`` or ``fp8``
``METHOD+SCHEME``          a caching method and quantization in one ``accel.apply`` (``front@2+int8-dynamic``):
                           calibrated and corrected along the cached trajectory (cache-aware, the default)
``PATH.json``              a Schedule JSON or a CacheConfig JSON (e.g. from ``accel schedule`` or ``accel search``)
``DIR@S``                  the best schedule at >= ``S``x measured speedup of the front ``accel search`` saved in
                           ``DIR``; ``front@S`` picks from the bundled model's front (e.g. ``front@2``)
``diffusers-fbc-T``        diffusers' FirstBlockCache with threshold ``T``
``diffusers-taylorseer``   diffusers' TaylorSeer cache (default config)
``diffusers-pab``          diffusers' Pyramid Attention Broadcast (self-attention every 2nd step in t 100..800)
``diffusers-fastercache``  diffusers' FasterCache (default config, image tensor layout)
``diffusers-magcache``     diffusers' MagCache (needs magnitude ratios: diffusers ships them for Flux only)
``cache-dit-T``            cache-dit's DBCache, threshold ``T``, first block computed (F1B0); ``cache-dit-FnBm-T``
                           computes the first ``n`` and last ``m`` blocks; a ``-taylorseer`` suffix adds its
                           TaylorSeer calibrator (order 1). Needs ``diffusers-accel[peers]``
=========================  =====================================================================================

:func:`parse_method` turns a name into a :class:`Method` (a frozen value); :func:`apply_method` applies it to
a pipeline as a context manager yielding an :class:`Applied` (the exact config as JSON, the step count to
run, a per-generation ``reset``), and undoes it on exit. A method that cannot run on a pipeline raises
:class:`UnsupportedMethod` with the reason, which the harness records instead of crashing.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accel.eval.combined import apply_parts, parse_combined
from accel.quant.schemes import SCHEMES  # torch only: torchao loads when a scheme runs


class UnsupportedMethod(RuntimeError):
    """A valid method that cannot run on this pipeline; ``str(error)`` says why."""


@dataclass(frozen=True, kw_only=True)
class Method:
    """One parsed method name.

    Attributes:
        name: the name as written, e.g. ``"fora-2"`` or ``"runs/best.json"``.
        kind: its grammar form, a key of :data:`FORMS`.
        params: the parsed parameters, JSON-ready.
    """

    name: str
    kind: str
    params: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in FORMS:
            raise ValueError(f"unknown method kind {self.kind!r}; known: {sorted(FORMS)}")
        object.__setattr__(self, "params", dict(self.params))

    def fingerprint(self) -> dict:
        """What identifies the method's output: name, kind, parameters, and a JSON file's content hash."""
        data = {"name": self.name, "kind": self.kind, "params": self.params}
        files = [part["params"]["path"] for part in self.parts if part["kind"] == "json"]
        hashes = [_file_hash(Path(path)) for path in files]
        if hashes:
            data["sha256"] = hashes[0] if self.kind == "json" else hashes
        return data

    @property
    def parts(self) -> list[dict]:
        """The parts the combined forms apply, ``{"kind", "params"}`` each: those of ``METHOD+METHOD``, else the
        method itself as one part."""
        return _parts_of(self.kind, self.params)

    @property
    def slug(self) -> str:
        """A file-name-safe form of the name."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.name.replace("/", "_")).strip("_") or "method"


def _file_hash(path: Path) -> str:
    """SHA-256 of a method file, and of the tensors a plan keeps beside it (``.safetensors``), if any."""
    digest = hashlib.sha256(path.read_bytes())
    sidecar = path.with_suffix(".safetensors")
    if sidecar.exists():
        digest.update(sidecar.read_bytes())
    return digest.hexdigest()


@dataclass
class Applied:
    """A method in effect on a pipeline.

    Attributes:
        steps: denoising steps to run (the requested count, or the method's own, e.g. ``steps-10``).
        config: the exact configuration applied, JSON-ready.
        reset: call before every pipeline call, so no state leaks from one generation into the next.
        stats: what the technique did (e.g. accel's ``CacheStats``), JSON-ready, or None.
    """

    steps: int
    config: dict
    reset: Callable[[], None] = lambda: None
    stats: Callable[[], dict | None] = lambda: None


Apply = Callable[[Any, dict, int, bool], AbstractContextManager[Applied]]


@dataclass(frozen=True, kw_only=True)
class MethodForm:
    """One form of the grammar.

    Attributes:
        usage: how it is written, e.g. ``"fora-N"``.
        pattern: full-match regular expression for the name.
        parse: match -> parameters (raises ``ValueError`` for out-of-range values).
        apply: ``(pipe, params, steps, instrument) -> context manager yielding Applied``; ``instrument`` asks for
            technique statistics (slower), off while timing. None: the form's parts run through
            :func:`accel.eval.combined.apply_parts`, with the generation's call arguments.
        help: one line for error messages and ``--help``.
    """

    usage: str
    pattern: re.Pattern
    parse: Callable[[re.Match], dict]
    apply: Apply | None
    help: str


def _positive_int(text: str, what: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"{what} must be >= 1, got {value}")
    return value


# -- apply functions -----------------------------------------------------------------------------------------


@contextmanager
def _apply_full(pipe: Any, params: dict, steps: int, instrument: bool) -> Iterator[Applied]:
    yield Applied(steps=steps, config={"type": "full"})


@contextmanager
def _apply_steps(pipe: Any, params: dict, steps: int, instrument: bool) -> Iterator[Applied]:
    yield Applied(steps=params["steps"], config={"type": "steps", "steps": params["steps"]})


def cache_config(pipe: Any, kind: str, params: dict, steps: int, instrument: bool):
    """The ``CacheConfig`` of one of accel's caching methods (``kind``: a form of :data:`FORMS` such as ``"fora"``
    or ``"front"``, with its parsed ``params``) for a ``steps``-step call; ``instrument`` counts MACs (a method
    file's config: :func:`accel.eval.combined.load_json_config`).

    Raises:
        UnsupportedMethod: a front searched for another model.
    """
    from accel.caching import CacheConfig, FirstBlockPolicy, Schedule, delta_dit, fora, layout_of, taylorseer, tgate

    if kind == "front":
        from accel.caching import load_front
        from accel.pipelines.default import DEFAULT_FRONT_DIR

        folder = DEFAULT_FRONT_DIR if params["front"] == "front" else Path(params["front"])
        schedule = load_front(folder).pick(target_speedup=params["target_speedup"], num_steps=steps)
        try:
            schedule.check_layout(layout_of(pipe))
        except ValueError as error:
            raise UnsupportedMethod(f"the front in {folder} was searched for another model: {error}") from None
        return CacheConfig(schedule=schedule, count_macs=instrument)
    if kind == "fbc":
        return CacheConfig(schedule=FirstBlockPolicy(threshold=params["threshold"]), count_macs=instrument)
    layout = layout_of(pipe)
    makers: dict[str, Callable[[], Schedule]] = {
        "fora": lambda: fora(layout, steps, params["interval"]),
        "taylorseer": lambda: taylorseer(layout, steps, params["interval"]),
        "delta-dit": lambda: delta_dit(layout, steps, params["interval"]),
        "tgate": lambda: tgate(layout, steps, params.get("gate_step")),
    }
    return CacheConfig(schedule=makers[kind](), count_macs=instrument)


def _apply_accel(kind: str) -> Apply:
    @contextmanager
    def apply(pipe: Any, params: dict, steps: int, instrument: bool) -> Iterator[Applied]:
        import accel

        config = cache_config(pipe, kind, params, steps, instrument)
        with accel.apply(pipe, config) as handle:
            stats = handle.stats
            yield Applied(
                steps=steps,
                config=config.to_dict(),
                reset=handle.reset,
                stats=lambda: stats().to_dict() if instrument and stats() is not None else None,
            )

    return apply


def _budget(match: re.Match) -> dict:
    value = float(match["t"])
    if not 0 < value <= 1:
        raise ValueError(f"tokens-B: B is a fraction of token-steps in (0, 1], got {value}")
    return {"budget": value}


def _parts_of(kind: str, params: dict) -> list[dict]:
    return params["parts"] if kind == "combined" else [{"kind": kind, "params": params}]


def _apply_cache_dit(pipe: Any, params: dict, steps: int, instrument: bool) -> AbstractContextManager[Applied]:
    from accel.eval.cache_dit_peer import apply_cache_dit

    return apply_cache_dit(pipe, params, steps, instrument)


def _cache_dit(match: re.Match) -> dict:
    params = _threshold(match)
    first, last = int(match["f"] or 1), int(match["b"] or 0)
    if first < 1:
        raise ValueError(f"cache-dit-FnBm-T: n (the blocks computed first) must be >= 1, got {first}")
    return {**params, "first": first, "last": last, "taylorseer": match["ts"] is not None}


def _apply_diffusers(kind: str) -> Apply:
    def apply(pipe: Any, params: dict, steps: int, instrument: bool) -> AbstractContextManager[Applied]:
        from accel.eval.diffusers_cache import apply_diffusers_cache

        return apply_diffusers_cache(pipe, kind, params, steps)

    return apply


# -- the registry --------------------------------------------------------------------------------------------


def _threshold(match: re.Match) -> dict:
    value = float(match["t"])
    if not value >= 0:
        raise ValueError(f"threshold must be >= 0, got {value}")
    return {"threshold": value}


_NUMBER = r"(?P<t>\d+(?:\.\d*)?|\.\d+)"


def _fixed_diffusers_form(name: str, help_text: str) -> MethodForm:
    """The form of a diffusers cache that takes no parameter: the name is the whole method."""
    return MethodForm(
        usage=name,
        pattern=re.compile(re.escape(name)),
        parse=lambda m: {},
        apply=_apply_diffusers(name),
        help=help_text,
    )


def _interval_form(kind: str, help_text: str) -> MethodForm:
    """The form ``KIND-N`` of an accel heuristic whose parameter is its refresh interval ``N``."""
    return MethodForm(
        usage=f"{kind}-N",
        pattern=re.compile(rf"{kind}-(?P<n>\d+)"),
        parse=lambda m: {"interval": _positive_int(m["n"], f"{kind}-N: N")},
        apply=_apply_accel(kind),
        help=help_text,
    )


#: form name -> its grammar entry; the order is the order of the help text
FORMS: dict[str, MethodForm] = {
    "full": MethodForm(
        usage="full", pattern=re.compile("full"), parse=lambda m: {}, apply=_apply_full, help="every step computed"
    ),
    "steps": MethodForm(
        usage="steps-N",
        pattern=re.compile(r"steps-(?P<n>\d+)"),
        parse=lambda m: {"steps": _positive_int(m["n"], "steps-N: N")},
        apply=_apply_steps,
        help="N denoising steps, no caching",
    ),
    "fora": _interval_form("fora", "FORA, recompute every N steps"),
    "taylorseer": _interval_form("taylorseer", "TaylorSeer, recompute every N steps, first-order forecast between"),
    "delta-dit": MethodForm(
        usage="delta-dit[-N]",
        pattern=re.compile(r"delta-dit(?:-(?P<n>\d+))?"),
        parse=lambda m: {"interval": _positive_int(m["n"] or "2", "delta-dit-N: N")},
        apply=_apply_accel("delta-dit"),
        help="Delta-DiT, refresh interval N (default 2)",
    ),
    "tgate": MethodForm(
        usage="tgate[-K]",
        pattern=re.compile(r"tgate(?:-(?P<k>\d+))?"),
        parse=lambda m: {"gate_step": _positive_int(m["k"], "tgate-K: K")} if m["k"] else {},
        apply=_apply_accel("tgate"),
        help="T-GATE, cross-attention frozen from step K (default 40% of the steps)",
    ),
    "fbc": MethodForm(
        usage="fbc-T",
        pattern=re.compile(rf"fbc-{_NUMBER}"),
        parse=_threshold,
        apply=_apply_accel("fbc"),
        help="accel's per-sample first-block cache, threshold T",
    ),
    "tokens": MethodForm(
        usage="tokens-B",
        pattern=re.compile(rf"tokens-{_NUMBER}"),
        parse=_budget,
        apply=None,
        help="per-token step allocation computing the fraction B of the token-steps",
    ),
    "quant": MethodForm(
        usage="SCHEME",
        pattern=re.compile("|".join(SCHEMES)),
        parse=lambda m: {"scheme": m[0]},
        apply=None,
        help="quantization alone (int8-weight, int8-dynamic, int8-static, fp8)",
    ),
    "combined": MethodForm(
        usage="METHOD+METHOD",
        pattern=re.compile(r"[^+]+(?:\+[^+]+)+"),
        parse=parse_combined,
        apply=None,
        help="techniques in one accel.apply, one part each: caching, tokens-B, SCHEME, plan or schedule JSON",
    ),
    "json": MethodForm(
        usage="PATH.json",
        pattern=re.compile(r"(?P<path>.+\.json)"),
        parse=lambda m: {"path": m["path"]},
        apply=None,
        help="a Schedule, CacheConfig, sparse-attention plan or quantization plan JSON file",
    ),
    "front": MethodForm(
        usage="DIR@S",
        pattern=re.compile(r"(?P<front>.+)@(?P<s>\d+(?:\.\d*)?)"),
        parse=lambda m: {"front": m["front"], "target_speedup": float(m["s"])},
        apply=_apply_accel("front"),
        help="a searched front's best schedule at >= S x speedup (front@S: the bundled model's)",
    ),
    "diffusers-fbc": MethodForm(
        usage="diffusers-fbc-T",
        pattern=re.compile(rf"diffusers-fbc-{_NUMBER}"),
        parse=_threshold,
        apply=_apply_diffusers("diffusers-fbc"),
        help="diffusers' FirstBlockCache, threshold T",
    ),
    **{
        name: _fixed_diffusers_form(name, help_text)
        for name, help_text in (
            ("diffusers-taylorseer", "diffusers' TaylorSeer cache"),
            ("diffusers-pab", "diffusers' Pyramid Attention Broadcast"),
            ("diffusers-fastercache", "diffusers' FasterCache"),
            ("diffusers-magcache", "diffusers' MagCache"),
        )
    },
    "cache-dit": MethodForm(
        usage="cache-dit[-FnBm]-T",
        pattern=re.compile(rf"cache-dit(?:-F(?P<f>\d+)B(?P<b>\d+))?-{_NUMBER}(?P<ts>-taylorseer)?"),
        parse=_cache_dit,
        apply=_apply_cache_dit,
        help="cache-dit's DBCache, threshold T, F1B0 unless FnBm; -taylorseer: its calibrator (extra: peers)",
    ),
}


def usage() -> str:
    """Every valid form with its meaning, one per line."""
    return "\n".join(f"  {form.usage:<24}{form.help}" for form in FORMS.values())


def parse_method(name: str) -> Method:
    """Parse one method name (see the module docstring).

    Raises:
        ValueError: a name matching no form, or a parameter out of range, with the list of valid forms.
    """
    text = name.strip()
    for kind, form in FORMS.items():
        match = form.pattern.fullmatch(text)
        if match is None:
            continue
        try:
            return Method(name=text, kind=kind, params=form.parse(match))
        except ValueError as error:
            raise ValueError(f"bad method {text!r}: {error}") from None
    raise ValueError(f"unknown method {text!r}; valid forms:\n{usage()}")


def parse_methods(text: str | list[str] | tuple[str, ...]) -> list[Method]:
    """Parse a comma-separated list (or a list of names); ``full`` is put first, added if missing.

    Raises:
        ValueError: an unknown or repeated name, or an empty list.
    """
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if not names:
        raise ValueError(f"no methods given; valid forms:\n{usage()}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"methods listed twice: {', '.join(repeated)}")
    methods = [parse_method(n) for n in names]
    return [parse_method("full")] + [m for m in methods if m.kind != "full"]


def apply_method(
    method: Method, pipe: Any, steps: int, instrument: bool = False, call_kwargs: dict | None = None
) -> AbstractContextManager[Applied]:
    """Apply ``method`` to ``pipe`` for a ``steps``-step generation; a context manager yielding :class:`Applied`.
    ``call_kwargs`` are the generation's pipeline arguments (sizes, ``guidance_scale``): a quantization method
    calibrates with them.

    Raises:
        UnsupportedMethod: the method cannot run on this pipeline (the message says why).
    """
    apply = FORMS[method.kind].apply
    if apply is None:
        return apply_parts(pipe, {"parts": method.parts}, steps, instrument, call_kwargs)
    return apply(pipe, method.params, steps, instrument)
