"""Per-linear formats: ``--override PATTERN=FORMAT`` resolved against the linears of a model.

Every linear has one name from the structure pass (``layers.3.down_proj``, ``lm_head``) and two Hugging Face
spellings (``layers.3.mlp.down_proj``, ``model.layers.3.mlp.down_proj``; attention: ``self_attn.q_proj``); a
PATTERN is an ``fnmatch`` glob matched against any of them (``layers.*.mlp.down_proj``, ``layers.0.*``,
``*.q_proj``). FORMAT is a weight format (the activation format stays), ``WEIGHTS/ACTS`` (both), or ``none``
alone (the linear stays float: weights and activations). Overrides apply in order, so a later one wins.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping, Sequence

from mxonnx import formats
from mxonnx.errors import InputError

_HF_MODULE = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
              "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


@dataclasses.dataclass(frozen=True)
class LinearFormat:
    """The weight and activation formats of one linear."""

    weights: formats.MXFormat
    acts: formats.MXFormat

    @property
    def quantized(self) -> bool:
        return self.weights.kind != "none" or self.acts.kind != "none"

    def __str__(self) -> str:
        return f"{self.weights.name}/{self.acts.name}"


@dataclasses.dataclass(frozen=True)
class Override:
    """One ``PATTERN=FORMAT``: ``acts`` None keeps the linear's activation format."""

    text: str
    pattern: str
    weights: formats.MXFormat
    acts: formats.MXFormat | None

    def apply(self, current: LinearFormat) -> LinearFormat:
        return LinearFormat(self.weights, current.acts if self.acts is None else self.acts)


def parse_override(text: str) -> Override:
    """``PATTERN=FORMAT`` (see the module docstring); a bad spelling or format raises ``InputError``."""
    pattern, sep, spec = text.partition("=")
    pattern, spec = pattern.strip(), spec.strip()
    if not sep or not pattern or not spec:
        raise InputError(f"--override {text!r}: expected PATTERN=FORMAT or PATTERN=WEIGHTS/ACTS, "
                         "e.g. layers.*.down_proj=mxint8-32")
    weights, slash, acts = spec.partition("/")
    try:
        w = formats.parse_format(weights.strip())
        a = formats.parse_format(acts.strip()) if slash else (w if w.kind == "none" else None)
    except InputError as exc:
        raise InputError(f"--override {text!r}: {exc}") from None
    return Override(text, pattern, w, a)


def linear_aliases(name: str) -> tuple[str, ...]:
    """The names a pattern may match: ``layers.3.down_proj``, ``layers.3.mlp.down_proj``,
    ``model.layers.3.mlp.down_proj`` (``lm_head``: itself)."""
    prefix, _, role = name.rpartition(".")
    if role not in _HF_MODULE or not prefix:
        return (name,)
    hf = f"{prefix}.{_HF_MODULE[role]}.{role}"
    return name, hf, f"model.{hf}"


def matches(pattern: str, name: str) -> bool:
    return any(fnmatch.fnmatchcase(alias, pattern) for alias in linear_aliases(name))


def resolve_formats(names: Sequence[str], weights: str | formats.MXFormat, acts: str | formats.MXFormat,
                    overrides: Sequence[str | Override] = (), hint: str = "") -> dict[str, LinearFormat]:
    """``{name: LinearFormat}`` for ``names``: ``weights``/``acts`` for all, then each override in order on the
    names it matches. A pattern matching no name raises ``InputError`` (``hint`` is added to the message)."""
    base = LinearFormat(formats.parse_format(weights), formats.parse_format(acts))
    result = {name: base for name in names}
    for override in overrides:
        override = parse_override(override) if isinstance(override, str) else override
        hit = [name for name in names if matches(override.pattern, name)]
        if not hit:
            raise InputError(f"--override {override.text!r}: pattern {override.pattern!r} matches no linear (names "
                             f"look like {', '.join(_examples(names))}){hint}")
        for name in hit:
            result[name] = override.apply(result[name])
    return result


def _examples(names: Sequence[str]) -> list[str]:
    picks = [n for n in names if n.startswith("layers.0.")][:1] + [n for n in names if n.endswith("down_proj")][:1]
    return [*dict.fromkeys([*(linear_aliases(picks[0])[:2] if picks else ()), *picks[1:], *names[-1:]])]


def distinct(linear_formats: Mapping[str, LinearFormat]) -> list[LinearFormat]:
    """The different formats used, in first-use order."""
    return list(dict.fromkeys(linear_formats.values()))
