"""`Span`: a half-open range of token positions, the one definition every study uses."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """Token positions `start <= j < end` (half-open, like Python slices)."""

    start: int
    end: int

    def __post_init__(self) -> None:
        for value in (self.start, self.end):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Span bounds must be ints, got Span({self.start!r}, {self.end!r})")
        if self.start < 0:
            raise ValueError(f"{self} is negative: token positions start at 0")
        if self.end < self.start:
            raise ValueError(f"{self} is reversed: end < start")
        if self.end == self.start:
            raise ValueError(f"{self} is empty: it holds no token")

    def __len__(self) -> int:
        return self.end - self.start

    def __repr__(self) -> str:
        return f"Span({self.start}, {self.end})"

    def check(self, seq_len: int) -> "Span":
        """Return self if it fits a sequence of `seq_len` tokens, else raise ValueError."""
        if self.end > seq_len:
            raise ValueError(f"{self} lies past the sequence: it ends at {self.end} > sequence length {seq_len}")
        return self

    def overlaps(self, other: "Span") -> bool:
        return self.start < other.end and other.start < self.end

    @property
    def slice(self) -> slice:
        return slice(self.start, self.end)


def check_spans(spans: dict[str, Span], seq_len: int) -> dict[str, Span]:
    """Validate named spans against a sequence length (a non-Span value is a TypeError)."""
    if not spans:
        raise ValueError("no spans given: pass at least one named Span")
    for name, span in spans.items():
        if not isinstance(span, Span):
            raise TypeError(f"span {name!r} is {type(span).__name__}, expected fdlib.Span")
        try:
            span.check(seq_len)
        except ValueError as err:
            raise ValueError(f"span {name!r}: {err}") from None
    return spans
