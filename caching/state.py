"""Pure cache state: stored features and their reuse or extrapolation. Plain tensor maths, no hooks.

A feature is a tensor or a tuple of tensors (``None`` entries allowed), e.g. a joint attention's
``(hidden_states, encoder_hidden_states)``.
"""

from __future__ import annotations

import torch

Feature = torch.Tensor | tuple | None


def map_feature(fn, *features: Feature) -> Feature:
    """Apply ``fn`` leaf-wise over tensors (or tuples of tensors) of the same structure; ``None`` stays."""
    first = features[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return fn(*features)
    return tuple(map_feature(fn, *parts) for parts in zip(*features))


def feature_bytes(feature: Feature) -> int:
    """Memory held by the tensors of ``feature``."""
    if feature is None:
        return 0
    if isinstance(feature, torch.Tensor):
        return feature.numel() * feature.element_size()
    return sum(feature_bytes(part) for part in feature)


def _first_tensor(feature: Feature) -> torch.Tensor:
    if isinstance(feature, torch.Tensor):
        return feature
    return next(_first_tensor(part) for part in feature if part is not None)


def is_complete(feature: Feature) -> bool:
    """Whether ``feature`` has no ``None`` part."""
    if feature is None:
        return False
    return isinstance(feature, torch.Tensor) or all(is_complete(part) for part in feature)


def sum_features(features: list[Feature]) -> Feature:
    """The leaf-wise sum of features of one structure."""
    total = features[0]
    for feature in features[1:]:
        total = map_feature(torch.add, total, feature)
    return total


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _same_structure(stored: Feature, like: Feature) -> bool:
    """Whether ``like`` fits ``stored``; a stored ``None`` (an output the block does not return) fits anything."""
    a, b = stored, like
    if a is None:
        return True
    if b is None:
        return False
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
    return len(a) == len(b) and all(_same_structure(x, y) for x, y in zip(a, b))


class FeatureCache:
    """The last few computed values of one feature, and their reuse at later steps.

    With ``order == 0`` :meth:`predict` returns the last stored value. With ``order == k`` it extrapolates a
    degree-``k`` polynomial in the step index through the last ``k + 1`` stored values (Newton divided
    differences; first order with ``k == 1``, TaylorSeer-style with ``k >= 2``), using fewer points while
    fewer are stored.

    Args:
        order: extrapolation order.
        dtype: storage dtype (e.g. ``torch.bfloat16`` to bound memory); values are returned in their original
            dtype. ``None`` stores as given.
    """

    def __init__(self, order: int = 0, dtype: torch.dtype | None = None):
        self.order = order
        self.dtype = dtype
        self._steps: list[int] = []
        self._values: list[Feature] = []
        self._out_dtype: torch.dtype | None = None
        self._coefficients: list[Feature] | None = None  # Newton form of the stored values, built on first use
        self.version = 0  # counts the changes of the stored values (for sums cached over several caches)

    def __len__(self) -> int:
        return len(self._values)

    @property
    def nbytes(self) -> int:
        """Memory held by the stored values and the extrapolation coefficients built from them."""
        held = sum(feature_bytes(value) for value in self._values)
        if self._coefficients is not None:  # the first coefficient is the newest value unless it was upcast
            newest = _first_tensor(self._values[-1])
            upcast = _first_tensor(self._coefficients[0]).data_ptr() != newest.data_ptr()
            held += sum(feature_bytes(c) for c in self._coefficients[0 if upcast else 1 :])
        return held

    def reset(self) -> None:
        """Forget everything."""
        self._steps.clear()
        self._values.clear()
        self._coefficients = None
        self.version += 1

    def _store(self, value: Feature) -> Feature:
        if self.dtype is None:
            return map_feature(lambda t: t.detach(), value)
        return map_feature(lambda t: t.detach().to(self.dtype), value)

    def update(self, step: int, value: Feature) -> None:
        """Store the value computed at ``step``; keeps the last ``order + 1`` values."""
        self._out_dtype = _first_tensor(value).dtype
        self._coefficients = None
        self.version += 1
        if self._steps and self._steps[-1] == step:
            self._steps.pop()
            self._values.pop()
        self._steps.append(step)
        self._values.append(self._store(value))
        del self._steps[: -(self.order + 1)]
        del self._values[: -(self.order + 1)]

    def update_rows(self, step: int, value: Feature, rows: torch.Tensor) -> None:
        """Store ``value`` only for the batch rows where ``rows`` (bool, ``(batch,)``, best on ``value``'s device:
        no synchronisation then) is True (order 0 only)."""
        if not self._values:
            self.update(step, value)
            return

        def merge(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
            keep = rows.view(-1, *([1] * (new.ndim - 1))).to(new.device)
            return torch.where(keep, new.detach().to(old.dtype), old)

        self._values[-1] = map_feature(merge, value, self._values[-1])
        self._steps[-1] = step
        self._coefficients = None
        self.version += 1

    @classmethod
    def sum_of(cls, caches: list[FeatureCache]) -> FeatureCache | None:
        """A cache holding, at each step the ``caches`` stored, the sum of their values (at least float32), so
        that its prediction is the sum of theirs (extrapolation is linear in the values) at the cost of one;
        None unless all have the same order and stored steps and every value is complete."""
        first = caches[0]
        if not first._values or any(c.order != first.order or c._steps != first._steps for c in caches):
            return None
        total = cls(order=first.order)
        for k, step in enumerate(first._steps):
            values = [map_feature(_at_least_float32, c._values[k]) for c in caches]
            if any(not is_complete(v) for v in values):
                return None
            total.update(step, sum_features(values))
        return total

    @property
    def complete(self) -> bool:
        """Whether a value is stored and it has no ``None`` part (an output the block did not return)."""
        return bool(self._values) and is_complete(self._values[-1])

    @property
    def newest(self) -> Feature:
        """The newest stored value as stored (in the storage dtype), or None if nothing is stored."""
        return self._values[-1] if self._values else None

    @property
    def batch_size(self) -> int | None:
        """Leading dimension of the stored value, or None if nothing is stored."""
        return _first_tensor(self._values[-1]).shape[0] if self._values else None

    def matches(self, like: Feature) -> bool:
        """Whether the stored value has the structure and shapes of ``like`` (e.g. same batch size)."""
        return bool(self._values) and _same_structure(self._values[-1], like)

    def predict(self, step: int) -> Feature:
        """The value at ``step`` from the stored ones; raises ``LookupError`` if nothing is stored."""
        if not self._values:
            raise LookupError("FeatureCache is empty")
        if len(self._values) == 1 or self.order == 0:
            result = self._values[-1]
        else:
            result = self._extrapolate(step)
        if self.dtype is None:
            return result
        return map_feature(lambda t: t.to(self._out_dtype), result)

    def _extrapolate(self, step: int) -> Feature:
        # Newton form on the points newest-first: f(x) = sum_i c_i * prod_{j<i} (x - x_j); the coefficients
        # are computed once per update, so each reused step costs one multiply-add per order.
        xs = [float(s) for s in reversed(self._steps)]
        if self._coefficients is None:
            coefficients = [map_feature(_at_least_float32, value) for value in reversed(self._values)]
            for level in range(1, len(xs)):
                for i in range(len(xs) - 1, level - 1, -1):
                    span = xs[i] - xs[i - level]
                    coefficients[i] = map_feature(
                        lambda a, b, s=span: (a - b) / s, coefficients[i], coefficients[i - 1]
                    )
            self._coefficients = coefficients
        # Evaluate with Horner's scheme around the newest points.
        result = self._coefficients[-1]
        for i in range(len(xs) - 2, -1, -1):
            factor = float(step) - xs[i]
            result = map_feature(lambda c, r, f=factor: torch.add(c, r, alpha=f), self._coefficients[i], result)
        return map_feature(lambda r, ref: r.to(ref.dtype), result, self._values[-1])


def as_tuple(output) -> tuple:
    """A block's output as a tuple (a single tensor becomes a 1-tuple)."""
    return output if isinstance(output, tuple) else (output,)


def residual_of(output, inputs: tuple) -> tuple:
    """What a block added: ``output - inputs`` element-wise, ``inputs`` in the order of the block's outputs."""
    return map_feature(lambda out, x: out - x, as_tuple(output), inputs)
