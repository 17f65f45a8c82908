import math

import numpy as np
import pytest

from fdlib import Span, best_subspan_em, bootstrap_ci
from fdlib.core.metrics import normalize_answer
from fdlib.core.spans import check_spans


def test_span_basics():
    s = Span(3, 7)
    assert len(s) == 4 and s.slice == slice(3, 7)
    assert s.check(7) is s
    assert s.overlaps(Span(6, 9)) and not s.overlaps(Span(7, 9))


@pytest.mark.parametrize(
    "start,end,match",
    [(5, 5, "Span\\(5, 5\\) is empty"), (-1, 3, "Span\\(-1, 3\\) is negative"), (6, 2, "Span\\(6, 2\\) is reversed")],
)
def test_bad_spans_raise(start, end, match):
    with pytest.raises(ValueError, match=match):
        Span(start, end)


def test_span_past_sequence_names_span_and_length():
    with pytest.raises(ValueError, match=r"Span\(8, 12\).*sequence length 10"):
        Span(8, 12).check(10)
    with pytest.raises(ValueError, match=r"span 'doc3'.*sequence length 10"):
        check_spans({"ok": Span(0, 2), "doc3": Span(8, 12)}, 10)
    with pytest.raises(ValueError, match="no spans"):
        check_spans({}, 10)
    with pytest.raises(TypeError):
        check_spans({"x": (0, 2)}, 10)
    with pytest.raises(TypeError):
        Span(0.5, 2)


@pytest.mark.parametrize(
    "text,norm",
    [
        ("The Beatles!", "beatles"),
        ("  an   Apple, a day ", "apple day"),
        ("Théâtre-Français", "théâtrefrançais"),
        ("A.B.C.", "abc"),
        ("theatre then", "theatre then"),  # articles only as whole words
    ],
)
def test_normalize_answer(text, norm):
    assert normalize_answer(text) == norm


def test_best_subspan_em():
    assert best_subspan_em("It was Wilhelm Conrad Röntgen, in 1901.", ["Wilhelm Conrad Röntgen"])
    assert best_subspan_em("the answer is THE Beatles", ["Beatles", "x"])
    assert not best_subspan_em("Paul McCartney", ["The Beatles"])
    assert not best_subspan_em("", ["a"])  # an answer normalised to "" never matches
    assert best_subspan_em("1997 crash", ["1997"])
    assert not best_subspan_em("19970", ["1998"])
    with pytest.raises(TypeError):
        best_subspan_em("x", "x")
    with pytest.raises(ValueError):
        best_subspan_em("x", [])


def test_bootstrap_ci_brackets_mean_and_ignores_nan():
    x = np.r_[np.ones(30), np.zeros(70), [np.nan] * 5]
    mean, lo, hi = bootstrap_ci(x, seed=1)
    assert mean == pytest.approx(0.3)
    assert lo < 0.3 < hi and 0.15 < lo and hi < 0.45
    assert bootstrap_ci(x, seed=1) == (mean, lo, hi)  # seeded
    assert all(math.isnan(v) for v in bootstrap_ci([np.nan]))
    with pytest.raises(ValueError):
        bootstrap_ci([1.0, 0.0], level=1.5)
