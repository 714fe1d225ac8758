"""Decoder layer sets: the one syntax of every option that names layers of the language model — ``avar.layers``
(SFT's AVAR layers), ``reward.visual_layers`` (GRPO's r_visual), ``--layers`` of `avar vas`, ``layers`` and
``sweep_layers`` of `avar intervene`, ``generation.intervene_layers`` of `avar eval`.

A layer set is one of
    "all"        every decoder layer
    "middle"     the training-free intervention band (docs/method.md): layers 8-13 of 28, scaled to the depth
    "A-B"        layers A..B, inclusive, 0-based
    "i,j,k"      those layers; comma-separated pieces mix: "0-3,10"
    [i, j, k]    a YAML list of 0-based indexes (a single int: that layer)
It is resolved against the model's depth into sorted, distinct indexes (:func:`parse_layers`); the syntax alone
is checked without the model (:func:`check_layer_set`, for configs).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["LayerSet", "middle_layers", "check_layer_set", "parse_layers"]

LayerSet = str | int | Sequence[int]
_SYNTAX = "use 'all', 'middle', 'A-B' (A <= B, inclusive), comma-separated indexes like '0,5,7', or a list of indexes"


def middle_layers(num_layers: int) -> tuple[int, ...]:
    """The default intervention band (docs/method.md, 'Training-free intervention'): layers 8-13 of 28, scaled to
    ``num_layers``."""
    start = min(num_layers - 1, round(num_layers * 8 / 28))
    end = max(start + 1, round(num_layers * 14 / 28))
    return tuple(range(start, min(end, num_layers)))


def _pieces(spec: LayerSet, field: str) -> list[range] | str:
    """"all" / "middle", or the index ranges the set names; ValueError naming ``field`` for a bad spelling."""
    if isinstance(spec, bool):
        raise ValueError(f"{field} {spec!r}: not a layer set; {_SYNTAX}")
    if isinstance(spec, int):
        return [range(spec, spec + 1)]
    if not isinstance(spec, str):
        try:
            indexes = list(spec)
        except TypeError:
            raise ValueError(f"{field} {spec!r}: not a layer set; {_SYNTAX}") from None
        if not indexes or not all(isinstance(i, int) and not isinstance(i, bool) for i in indexes):
            raise ValueError(f"{field} {indexes!r}: a list of layers must hold int indexes, at least one")
        return [range(i, i + 1) for i in indexes]
    text = spec.strip()
    if text.lower() in ("all", "middle"):
        return text.lower()
    chosen = []
    for piece in text.split(","):
        piece = piece.strip()
        try:
            if "-" in piece[1:]:
                start_text, end_text = piece.split("-", 1) if not piece.startswith("-") else ("", piece)
                start, end = int(start_text), int(end_text)
                if start > end:
                    raise ValueError
                chosen.append(range(start, end + 1))
            else:
                chosen.append(range(int(piece), int(piece) + 1))
        except ValueError:
            raise ValueError(f"{field} {text!r}: cannot read {piece!r}; {_SYNTAX}") from None
    return chosen


def check_layer_set(spec: LayerSet, *, field: str = "layer set") -> str | tuple[int, ...]:
    """``spec`` checked for its syntax only (the model's depth is not known yet): a string as given, a list as a
    tuple of ints. ValueError naming ``field`` (e.g. "avar.layers") and the syntax otherwise."""
    _pieces(spec, field)
    return spec if isinstance(spec, str) else (spec,) if isinstance(spec, int) else tuple(spec)


def parse_layers(spec: LayerSet, num_layers: int, *, field: str = "layer set") -> tuple[int, ...]:
    """Sorted distinct decoder layer indexes in [0, num_layers) named by ``spec`` (module docstring).

    "all" -> every layer; "middle" -> middle_layers(num_layers); "8-13" -> 8..13 inclusive; "0,5,27" -> those;
    "0-3,10" -> a mix; [3, 1, 1] -> (1, 3). Raises ValueError naming ``field``, the bad piece and the valid range.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be positive, got {num_layers}")
    pieces = _pieces(spec, field)
    if isinstance(pieces, str):  # "all" or "middle"
        return tuple(range(num_layers)) if pieces == "all" else middle_layers(num_layers)
    shown = repr(spec.strip()) if isinstance(spec, str) else repr(spec if isinstance(spec, int) else list(spec))
    for chosen in pieces:  # the first layer out of range, in the order the set names them
        if chosen.start < 0 or chosen.stop > num_layers:
            layer = chosen.start if not 0 <= chosen.start < num_layers else num_layers
            raise ValueError(f"{field} {shown}: layer {layer} is out of range; this model has {num_layers} decoder "
                             f"layers (0-{num_layers - 1})")
    return tuple(sorted({layer for chosen in pieces for layer in chosen}))
