"""Equivalence suite for the math verifier: forms models really write, right and nearly right.

Each pair is (what the model boxed, gold answer, expected reward), with the reason in a comment.
About half are equivalent (reward 1) and half near-misses (reward 0). All pairs go through the real
pipeline (`math_rewards`: answer extraction, then the worker pool) in one batch. "fixed" marks a
pair that scored the other way before `_brace_shorthand` and `_exact_equal` (rewards.py).

Left out on purpose (current behaviour, not asserted): `1\\,000` (thin-space thousands separator)
is read as 1*000 = 0 and scores 0 against 1000; elements of tuples and sets are compared by
math-verify with its tolerance, so {2^{-60}, 1} still equals {2^{-61}, 1}; an exact number beyond
10^10000 equals only the same expression, so 2^{2^{20}} does not match 2^{1048576}.
"""

import pytest

from rewards import _brace_shorthand, math_rewards

PAIRS = {
    "shorthand": [
        (r"\frac12", r"\frac{1}{2}", 1),  # TeX reads one token per bare argument
        (r"\sqrt2", r"\sqrt{2}", 1),  # bare surd
        (r"\frac1{2}", r"\frac{1}{2}", 1),  # bare numerator, braced denominator
        (r"\frac 3 4", r"\frac{3}{4}", 1),  # spaces between bare arguments
        (r"\frac\pi2", r"\frac{\pi}{2}", 1),  # a command as a bare argument (fixed)
        (r"\sqrt[3]2", r"\sqrt[3]{2}", 1),  # root index, then a bare argument (fixed)
        (r"\frac{\sqrt3}2", r"\frac{\sqrt{3}}{2}", 1),  # nested shorthand inside a braced argument
        (r"\frac123", r"\frac{3}{2}", 1),  # TeX: \frac{1}{2}3 = 3/2, as rendered (fixed)
        (r"\sqrt23", r"3\sqrt{2}", 1),  # TeX: \sqrt{2}3
        (r"\frac12", r"\frac{2}{1}", 0),  # numerator and denominator swapped
        (r"\frac123", r"\frac{1}{23}", 0),  # not 1/23: only one digit is the denominator (fixed)
        (r"\sqrt2", r"\sqrt{3}", 0),  # a different surd
        (r"\frac\pi3", r"\frac{\pi}{2}", 0),  # a different multiple of pi
        (r"\sqrt[3]2", r"\sqrt{2}", 0),  # cube root is not square root
        (r"\sqrt12", r"2\sqrt{3}", 0),  # TeX: \sqrt{1}2 = 2, not sqrt(12)
    ],
    "dfrac_tfrac": [
        (r"\dfrac34", r"\frac{3}{4}", 1),  # display-style fraction, bare arguments
        (r"\tfrac{1}2", r"\frac{1}{2}", 1),  # text-style fraction, one bare argument
        (r"\dfrac{1}{2}", r"\tfrac12", 1),  # both styles, shorthand on the gold side
        (r"\dfrac\pi3", r"\frac{\pi}{3}", 1),  # display style with a command argument (fixed)
        (r"\cfrac{1}{2}", r"0.5", 1),  # continued-fraction style against an exact decimal
        (r"\dfrac34", r"\frac{4}{3}", 0),  # reciprocal
        (r"\tfrac{1}3", r"0.333333", 0),  # a rounding of 1/3 is not 1/3 (fixed)
        (r"\tfrac13", r"\frac{1}{4}", 0),  # neighbouring unit fraction
    ],
    "mixed_numbers": [
        (r"2\frac12", r"\frac{5}{2}", 1),  # a mixed number means 2 + 1/2
        (r"15\frac{39}{40}", r"\frac{639}{40}", 1),  # MATH500-style mixed number
        (r"2\frac{1}{2}", r"2.5", 1),  # mixed number against the exact decimal
        (r"2\frac12", r"1", 0),  # not the product 2 * 1/2
        (r"2\frac{1}{2}", r"\frac{3}{2}", 0),  # not 2 - 1/2
        (r"1\frac{1}{3}", r"1.33", 0),  # 4/3 is not the rounded 1.33
    ],
    "large_powers": [
        (r"2^{-60}", r"\frac{1}{2^{60}}", 1),  # same tiny value, two forms
        (r"2^{100}", r"1267650600228229401496703205376", 1),  # a power against its digits
        (r"4^{30}", r"2^{60}", 1),  # same value, different bases
        (r"10^{-30}", r"1e-30", 1),  # tiny power against e-notation
        (r"2^{-60}", r"2^{-61}", 0),  # distinct tiny values: no tolerance (fixed)
        (r"\frac{1}{2^{60}}", r"\frac{1}{2^{61}}", 0),  # the same, as fractions (fixed)
        (r"10^{-30}", r"2\cdot 10^{-30}", 0),  # a factor of 2 at 1e-30 (fixed)
        (r"2^{-100}", r"0", 0),  # tiny is not zero
        (r"2^{100}", r"2^{100}+1", 0),  # off by one at 1e30
        (r"\sqrt{10^{40}+1}", r"10^{20}", 0),  # differs by 5e-21 (fixed)
        (r"2^{-60}", r"0.0", 0),  # a decimal zero is not a tiny exact value (fixed)
    ],
    "surds": [
        (r"\sqrt{8}", r"2\sqrt{2}", 1),  # simplified surd
        (r"\frac{1}{\sqrt2}", r"\frac{\sqrt{2}}{2}", 1),  # rationalised denominator
        (r"\sqrt{3+2\sqrt2}", r"1+\sqrt{2}", 1),  # nested radical that denests
        (r"\frac{2}{\sqrt5-1}", r"\frac{1+\sqrt{5}}{2}", 1),  # golden ratio, two forms
        (r"2\sqrt[3]{2}", r"\sqrt[3]{16}", 1),  # cube roots
        (r"1.41421357", r"\sqrt{2}", 0),  # 1.41421356...: last digit neither rounded nor cut (fixed)
        (r"2\sqrt3", r"3\sqrt{2}", 0),  # coefficient and radicand swapped
        (r"\sqrt{3+2\sqrt2}", r"1+\sqrt{3}", 0),  # close nested radical, wrong value
        (r"\frac{1+\sqrt5}{2}", r"\frac{1-\sqrt{5}}{2}", 0),  # the conjugate
    ],
    "pi_multiples": [
        (r"\frac12\pi", r"\frac{\pi}{2}", 1),  # coefficient written in front
        (r"\frac{3\pi}{4}", r"\frac{\pi}{4}\cdot 3", 1),  # same multiple, rearranged
        (r"2\pi", r"\pi + \pi", 1),  # a sum
        (r"3.14", r"\pi", 0),  # a rounding of pi to only 3 significant digits
        (r"6.2831854", r"2\pi", 0),  # 6.28318530...: last digit off, equal to 6 places (fixed)
        (r"\frac{\pi}{3}", r"\frac{\pi}{6}", 0),  # a different multiple
        (r"4\pi^2", r"4\pi", 0),  # an extra power
    ],
    "degrees": [
        (r"30^\circ", r"30", 1),  # degree sign on the answer
        (r"30", r"30^{\circ}", 1),  # degree sign on the gold
        (r"22.5^\circ", r"22.5", 1),  # decimal degrees
        (r"30^\circ", r"60", 0),  # complementary angle
        (r"90^\circ", r"180^\circ", 0),  # both with degree signs
    ],
    "percentages": [
        (r"50\%", r"50", 1),  # percent sign dropped on the gold
        (r"12.5\%", r"0.125", 1),  # a percentage as its fraction
        (r"25\%", r"25\%", 1),  # both with percent signs
        (r"50\%", r"5", 0),  # off by a factor of ten
        (r"12.5\%", r"1.25", 0),  # off by a factor of ten, as a fraction
    ],
    "thousands_separators": [
        (r"1,000", r"1000", 1),  # comma separator
        (r"1{,}000", r"1000", 1),  # braced comma, as LaTeX needs for spacing
        (r"1,000,000", r"10^{6}", 1),  # two separators against a power
        (r"10,000", r"1000", 0),  # one digit too many
        (r"1,001", r"1000", 0),  # off by one
    ],
    "scientific_notation": [
        (r"1.5e3", r"1500", 1),  # e-notation
        (r"1.5\times10^{3}", r"1500", 1),  # LaTeX scientific notation
        (r"2.5E-2", r"0.025", 1),  # capital E, negative exponent
        (r"6.02\times10^{23}", r"6.02e23", 1),  # both in scientific notation
        (r"1.6e3", r"1500", 0),  # wrong mantissa
        (r"1e-20", r"2e-20", 0),  # tiny values a factor of 2 apart (fixed)
        (r"1.0e-20", r"1.5\times10^{-20}", 0),  # tiny decimals: no 6-place rounding (fixed)
        (r"3\times10^{-5}", r"3\times10^{-6}", 0),  # wrong exponent
    ],
    "intervals_inequalities": [
        (r"[1,2)", r"[1,2)", 1),  # half-open interval
        (r"(3,\infty)", r"x > 3", 1),  # interval answer to an inequality gold
        (r"[-2, 5)", r"-2 \le x < 5", 1),  # double inequality as an interval
        (r"(-\infty,2)\cup(3,\infty)", r"(-\infty, 2) \cup (3, \infty)", 1),  # union
        (r"(1,2]", r"[1,2)", 0),  # endpoints' brackets swapped
        (r"x \ge 3", r"x > 3", 0),  # non-strict for strict
        (r"(-\infty,2]\cup(3,\infty)", r"(-\infty, 2) \cup (3, \infty)", 0),  # one endpoint closed
        (r"[3,\infty)", r"x > 3", 0),  # closed at 3
    ],
    "sets_unordered_lists": [
        (r"\{2,1\}", r"\{1,2\}", 1),  # set order does not matter
        (r"3, 1, 2", r"1, 2, 3", 1),  # a list of solutions in another order
        (r"\{\frac12, \sqrt2\}", r"\{\sqrt{2}, \frac{1}{2}\}", 1),  # shorthand inside a set
        (r"\{1,3\}", r"\{1,2\}", 0),  # one wrong element
        (r"1, 2", r"1, 2, 3", 0),  # a missing solution
    ],
    "plus_minus": [
        (r"\pm 3", r"3, -3", 1),  # plus-minus against both values
        (r"-3, 3", r"\pm 3", 1),  # both values against plus-minus
        (r"1\pm\sqrt2", r"1+\sqrt{2}, 1-\sqrt{2}", 1),  # plus-minus with a surd
        (r"3", r"\pm 3", 0),  # only one of the two values
        (r"1+\sqrt2", r"1 \pm \sqrt{2}", 0),  # only one of the two values, with a surd
    ],
    "matrices": [
        (r"\begin{pmatrix}1\\2\end{pmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}", 1),  # column vector
        (
            r"\begin{pmatrix}\frac12\\\sqrt2\end{pmatrix}",
            r"\begin{pmatrix}\frac{1}{2}\\\sqrt{2}\end{pmatrix}",
            1,
        ),  # shorthand inside a matrix
        (r"\begin{bmatrix}1&2\\3&4\end{bmatrix}", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", 1),  # brackets
        (r"\begin{pmatrix}1\\3\end{pmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}", 0),  # one wrong entry
        (r"\begin{pmatrix}1&3\\2&4\end{pmatrix}", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", 0),  # transpose
    ],
    "text_answers": [
        (r"\text{Monday}", r"Monday", 1),  # a word in \text{}
        (r"east", r"\text{East}", 1),  # case does not matter
        (r"(B)", r"\text{(B)}", 1),  # multiple-choice letter
        (r"Tuesday", r"Monday", 0),  # another word
        (r"Mondya", r"Monday", 0),  # an anagram (a product of symbols would commute)
        (r"C", r"\text{(B)}", 0),  # another choice
    ],
    "units_and_text": [
        (r"10\text{ cm}", r"10", 1),  # a unit after the number
        (r"5.4 \text{ cents}", r"5.4", 1),  # a unit after a decimal
        (r"\frac12\text{ cm}", r"\frac{1}{2}", 1),  # shorthand with a unit
        (r"12\text{ cm}^2", r"12", 1),  # a unit with a power
        (r"\$5", r"5", 1),  # a dollar sign
        (r"10\text{ cm}", r"100", 0),  # a unit does not hide a wrong number
        (r"5 \text{ meters}", r"6", 0),  # off by one, with a unit
    ],
    "variable_assignment": [
        (r"x = 3", r"3", 1),  # answer written as an assignment
        (r"3", r"x=3", 1),  # gold written as an assignment
        (r"x = \frac12", r"\frac{1}{2}", 1),  # assignment with shorthand
        (r"y = 2x + 1", r"y=2x+1", 1),  # an equation against the same equation
        (r"x = 4", r"3", 0),  # wrong value behind the assignment
        (r"y = 2x + 1", r"y=2x-1", 0),  # a different line
        (r"x = 2^{-60}", r"2^{-61}", 0),  # exact comparison behind an assignment (fixed)
        (r"x = \frac13", r"0.333333", 0),  # a rounding behind an assignment (fixed)
    ],
}

# Whole responses with several boxes: the last complete box is the answer (MATH convention).
SEVERAL_BOXES = [
    (r"First \boxed{1}, finally \boxed{2}.", "2", 1),  # the last box wins
    (r"So \boxed{x = 1}, and the value is \boxed{\frac12}.", r"\frac{1}{2}", 1),  # intermediate box first
    (r"\boxed{3} then \boxed{4", "3", 1),  # a truncated last box is skipped
    (r"\boxed{\frac12} hence $\boxed{\sqrt2}$", r"\sqrt{2}", 1),  # shorthand in the last box
    (r"First \boxed{1}, finally \boxed{2}.", "1", 0),  # an intermediate box is not the answer
    (r"\boxed{3} then \boxed{4", "4", 0),  # the truncated box is not read
    (r"\boxed{\frac12} hence $\boxed{\sqrt2}$", r"\frac{1}{2}", 0),  # the earlier box is not read
]


def _suite():
    rows = [
        (category, rf"Some work. So the result is $\boxed{{{answer}}}$.", answer, gold, expected)
        for category, pairs in PAIRS.items()
        for answer, gold, expected in pairs
    ]
    rows += [("several_boxes", response, response, gold, expected) for response, gold, expected in SEVERAL_BOXES]
    return rows


SUITE = _suite()


@pytest.fixture(scope="module")
def scores():
    return math_rewards([response for _, response, _, _, _ in SUITE], [gold for _, _, _, gold, _ in SUITE])


@pytest.mark.parametrize("category", list(PAIRS) + ["several_boxes"])
def test_equivalence_pairs(scores, category):
    wrong = [
        (answer, gold, expected, score)
        for (cat, _, answer, gold, expected), score in zip(SUITE, scores)
        if cat == category and score != expected
    ]
    assert not wrong, f"(answer, gold, expected, got): {wrong}"


@pytest.mark.parametrize(
    "latex, braced",
    [
        (r"\frac12", r"\frac{1}{2}"),
        (r"\frac1{2}", r"\frac{1}{2}"),
        (r"\tfrac{1}2", r"\tfrac{1}{2}"),
        (r"\dfrac34", r"\dfrac{3}{4}"),
        (r"\frac\pi2", r"\frac{\pi}{2}"),  # a command is one token
        (r"\sqrt[3]2", r"\sqrt[3]{2}"),  # the root index is not the argument
        (r"\frac123", r"\frac{1}{2}3"),  # one character per argument, as TeX reads it
        (r"\sqrt2x", r"\sqrt{2}x"),
        (r"\frac{\frac12}3", r"\frac{\frac{1}{2}}{3}"),  # shorthand inside a braced argument
        (r"\frac{1}{2}", r"\frac{1}{2}"),  # braced arguments are kept
        (r"\frac{", r"\frac{"),  # unclosed or missing arguments are left alone
        (r"\sqrt", r"\sqrt"),
        (r"\sqrtx", r"\sqrtx"),  # another command name, not \sqrt
    ],
)
def test_brace_shorthand_reads_one_token_per_argument(latex, braced):
    assert _brace_shorthand(latex) == braced
