"""Layer-set syntax shared by `avar vas` and `avar intervene`: "all", "middle", "A-B" (inclusive), "i,j,k" or a mix."""

from __future__ import annotations

__all__ = ["parse_layers", "middle_layers"]


def middle_layers(num_layers: int) -> tuple[int, ...]:
    """The default intervention band (docs/method.md, 'Training-free intervention'): layers 8-13 of 28, scaled to
    ``num_layers``."""
    start = min(num_layers - 1, round(num_layers * 8 / 28))
    end = max(start + 1, round(num_layers * 14 / 28))
    return tuple(range(start, min(end, num_layers)))


def parse_layers(text: str, num_layers: int) -> tuple[int, ...]:
    """Sorted distinct decoder layer indexes in [0, num_layers) named by ``text``.

    "all" -> every layer; "middle" -> middle_layers(num_layers); "8-13" -> 8..13 inclusive; "0,5,27" -> those; "0-3,10" -> a mix.
    Raises ValueError naming the bad piece and the valid range.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be positive, got {num_layers}")
    text = str(text).strip()
    if text.lower() == "all":
        return tuple(range(num_layers))
    if text.lower() == "middle":
        return middle_layers(num_layers)
    layers: set[int] = set()
    for piece in text.split(","):
        piece = piece.strip()
        try:
            if "-" in piece[1:]:
                start_text, end_text = piece.split("-", 1) if not piece.startswith("-") else ("", piece)
                start, end = int(start_text), int(end_text)
                if start > end:
                    raise ValueError
                chosen = range(start, end + 1)
            else:
                chosen = [int(piece)]
        except ValueError:
            raise ValueError(f"layer set {text!r}: cannot read {piece!r}; use 'all', 'middle', 'A-B' (A <= B, inclusive) or "
                             f"comma-separated indexes like '0,5,7'") from None
        for layer in chosen:
            if not 0 <= layer < num_layers:
                raise ValueError(f"layer set {text!r}: layer {layer} is out of range; this model has {num_layers} "
                                 f"decoder layers (0-{num_layers - 1})")
            layers.add(layer)
    return tuple(sorted(layers))
