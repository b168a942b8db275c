"""Formula plumbing: torch's sympy functions made plain, degrees, exact fast evaluation."""

import sympy
import torch.utils._sympy.functions as tf

from costmodel.formulas import Evaluator, degree, plain
from costmodel.symbols import dim_symbol, parse_formula, symbols_for

b, s, h = symbols_for("batch", "seq", "height")


def test_plain_rewrites_floor_division_and_parses_back():
    e = plain(tf.FloorDiv(h - 1, 2) + 1)
    assert e == sympy.floor((h - 1) / 2) + 1
    assert parse_formula(str(e), ["height"]) == e


def test_degree():
    assert degree(24 * b * s ** 2 + 10 * s, s) == 2
    assert degree(24 * b * s ** 2 + 10 * s, b) == 1
    assert degree(sympy.floor((h - 1) / 2) + 1, h) == 1
    assert degree(sympy.Max(b * s, s ** 2), s) == 2
    assert degree(sympy.Integer(7), s) == 0


def test_evaluator_is_exact_beyond_float_precision():
    big = 3 * b * s ** 2 / 2 + 10 ** 17 + 1          # rational coefficient, total > 2**53
    ev = Evaluator([big, b * s], ["batch", "seq"])
    value, product = ev({"batch": 2, "seq": 7})
    assert value == 3 * 2 * 49 // 2 + 10 ** 17 + 1 and isinstance(value, int)   # 147 + 10**17 + 1
    assert product == 14


def test_symbols_are_integer_positive_and_shared():
    assert dim_symbol("seq") is dim_symbol("seq") and dim_symbol("seq").is_integer and dim_symbol("seq").is_positive
