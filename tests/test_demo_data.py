"""Tests for the built-in demo corpus (gs_ray.data.demo): shape, determinism, balance, and that
the generated content is correct (math answers, finance arithmetic, runnable code)."""

from __future__ import annotations

import ast
import copy
import json
import math
import random
import re
import time
from collections import Counter
from typing import Any

import pytest

from gs_ray.data.demo import DOMAINS, build_demo_corpus
from gs_ray.data.demo import corpus as demo_data

KEYS = {"id", "instruction", "input", "output", "domain"}
BASE = ("math", "code", "finance", "stories", "support")
CROSS = ("finance_code", "math_story", "code_story")

NUM = r"\d+(?:\.\d+)?"
# "a op b [op c ...] = d" with plain numbers; "^" is a power.
EQUATION = re.compile(rf"(?<![\w.])({NUM}(?: [-+*/^] {NUM})+) = ({NUM})(?!\w)")
FENCE = re.compile(r"```python\n(.*?)```", re.S)
EXAMPLE = re.compile(r"`([^`\n]+)` (?:returns|returned|gives|gave) `([^`\n]+)`")
PLACEHOLDER = re.compile(r"\{[A-Za-z_][A-Za-z_0-9]*\}")


@pytest.fixture(scope="module")
def corpus() -> list[dict]:
    return build_demo_corpus()


def by_domain(records: list[dict], *domains: str) -> list[dict]:
    return [r for r in records if r["domain"] in domains]


def equations(text: str) -> list[tuple[float, float]]:
    """(value of the left side, right side) for every ``a op b = c`` in the text."""
    found = []
    for lhs, rhs in EQUATION.findall(text):
        value = eval(lhs.replace("^", "**"), {"__builtins__": {}})  # digits and operators only
        found.append((float(value), float(rhs)))
    return found


def close(got: Any, want: Any) -> bool:
    if isinstance(want, float) or isinstance(got, float):
        return isinstance(got, (int, float)) and math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9)
    if isinstance(want, (list, tuple)):
        return (
            isinstance(got, (list, tuple))
            and len(got) == len(want)
            and all(close(g, w) for g, w in zip(got, want))
        )
    if isinstance(want, dict):
        return dict(got).keys() == want.keys() and all(close(got[k], want[k]) for k in want)
    return got == want


# --------------------------------------------------------------------------- shape and determinism


def test_deterministic_and_seed_dependent() -> None:
    a, b = build_demo_corpus(), build_demo_corpus()
    assert json.dumps(a) == json.dumps(b)
    other = build_demo_corpus(seed=1)
    assert other != a
    assert sum(x["output"] == y["output"] for x, y in zip(a, other)) < len(a) // 20


def test_default_size(corpus: list[dict]) -> None:
    assert len(corpus) >= 2000
    assert len(corpus) == 2400


@pytest.mark.parametrize("n", [0, 1, 7, 50, 2400, 5000])
def test_n_samples_honoured(n: int) -> None:
    records = build_demo_corpus(n_samples=n, seed=3)
    assert len(records) == n
    assert [r["id"] for r in records] == [f"demo-{i:05d}" for i in range(n)]


def test_negative_size_rejected() -> None:
    with pytest.raises(ValueError):
        build_demo_corpus(n_samples=-1)


def test_record_schema(corpus: list[dict]) -> None:
    assert set(DOMAINS) == set(BASE) | set(CROSS)
    for r in corpus:
        assert set(r) == KEYS
        assert all(isinstance(r[k], str) for k in KEYS)
        assert r["instruction"].strip() and r["output"].strip()
        assert r["domain"] in DOMAINS
    assert len({r["id"] for r in corpus}) == len(corpus)


def test_no_unfilled_placeholders(corpus: list[dict]) -> None:
    for r in corpus:
        text = FENCE.sub("", "\n".join((r["instruction"], r["input"], r["output"])))
        assert not PLACEHOLDER.search(text), (r["id"], PLACEHOLDER.search(text))


# --------------------------------------------------------------------------- balance and variety


def test_domain_balance(corpus: list[dict]) -> None:
    counts = Counter(r["domain"] for r in corpus)
    assert set(counts) == set(DOMAINS)
    n = len(corpus)
    for d in BASE:
        assert counts[d] / n >= (0.05 if d == "support" else 0.10), (d, counts[d])
    cross = sum(counts[d] for d in CROSS) / n
    assert 0.10 <= cross <= 0.25


def test_domains_interleaved(corpus: list[dict]) -> None:
    assert len({r["domain"] for r in corpus[:100]}) == len(DOMAINS)


def test_distinct(corpus: list[dict]) -> None:
    n = len(corpus)
    assert len({r["output"] for r in corpus}) >= 0.95 * n
    assert len({(r["instruction"], r["input"]) for r in corpus}) >= 0.90 * n


def test_distinct_large_corpus() -> None:
    records = build_demo_corpus(n_samples=5000, seed=11)
    assert len({r["output"] for r in records}) >= 0.95 * len(records)


def test_lengths(corpus: list[dict]) -> None:
    for r in corpus:
        words = len(r["output"].split())
        assert 15 <= words <= 150, (r["id"], r["domain"], words)
        assert len(r["instruction"]) + len(r["input"]) + len(r["output"]) <= 1200, r["id"]


def test_fast() -> None:
    start = time.perf_counter()
    build_demo_corpus()
    assert time.perf_counter() - start < 1.0


# --------------------------------------------------------------------------- math


def check_math_output(output: str, answer: int | None = None) -> None:
    m = re.search(r"\nThe answer is (\d+)\.$", output)
    assert m, output
    eqs = equations(output)
    assert len(eqs) >= 2, output
    for lhs, rhs in eqs:
        assert abs(lhs - rhs) < 1e-9, (lhs, rhs, output)
    assert eqs[-1][1] == int(m.group(1)), output  # the last step yields the final answer
    if answer is not None:
        assert output.endswith(f"The answer is {answer}.")


@pytest.mark.parametrize("template", demo_data._MATH_TEMPLATES, ids=lambda t: t.__name__)
def test_math_templates(template) -> None:
    for seed in range(40):
        rec, answer = demo_data._math_item(random.Random(seed), template)
        assert rec["domain"] == "math" and isinstance(answer, int) and answer >= 0
        check_math_output(rec["output"], answer)
        story, s_answer = demo_data._math_story_item(random.Random(seed), template)
        assert story["domain"] == "math_story"
        check_math_output(story["output"], s_answer)


# Re-derive answers straight from the problem text for some templates.
REDERIVE = {
    "_m_shopping": (
        r"buys (\d+) .+? for \$(\d+) each and (\d+) .+? for \$(\d+) each",
        lambda a, p, b, q: a * p + b * q,
    ),
    "_m_change": (r"has \$(\d+) and buys (\d+) .+? cost \$(\d+) each", lambda m, n, p: m - n * p),
    "_m_discount": (r"costs \$(\d+)\. .+? sale with (\d+)% off", lambda p, d: p - p * d // 100),
    "_m_tickets": (
        r"cost \$(\d+) for adults and \$(\d+) for children\. .+? (\d+) adults and (\d+) children",
        lambda ad, ch, a, c: a * ad + c * ch,
    ),
    "_m_weekly": (
        r"(\d+) \S+ on Monday, (\d+) on Wednesday and (\d+) on Friday.+?in (\d+) weeks",
        lambda x, y, z, w: (x + y + z) * w,
    ),
    "_m_reading": (
        r"with (\d+) pages and reads (\d+) pages every day.+?after (\d+) days",
        lambda p, r, d: p - r * d,
    ),
    "_m_fence": (
        r"(\d+) meters long and (\d+) meters wide\. Fencing costs \$(\d+)",
        lambda length, width, c: 2 * (length + width) * c,
    ),
}


@pytest.mark.parametrize("name", sorted(REDERIVE))
def test_math_answers_rederived_from_text(name: str) -> None:
    pattern, solve = REDERIVE[name]
    template = getattr(demo_data, name)
    for seed in range(40):
        rec, answer = demo_data._math_item(random.Random(seed), template)
        m = re.search(pattern, rec["instruction"] + " " + rec["input"])
        assert m, rec
        assert solve(*map(int, m.groups())) == answer


def test_math_records_in_corpus(corpus: list[dict]) -> None:
    for r in by_domain(corpus, "math", "math_story"):
        check_math_output(r["output"])


# --------------------------------------------------------------------------- finance


def test_finance_arithmetic(corpus: list[dict]) -> None:
    for r in by_domain(corpus, "finance"):
        eqs = equations(r["output"])
        assert eqs, r["output"]
        for lhs, rhs in eqs:  # numbers are printed rounded (cents, 4-8 decimals for rates)
            assert abs(lhs - rhs) <= max(0.011, 1e-4 * abs(rhs)), (lhs, rhs, r["output"])


@pytest.mark.parametrize("template", demo_data._FINANCE_TEMPLATES, ids=lambda t: t.__name__)
def test_finance_templates(template) -> None:
    for seed in range(30):
        instruction, _, output = template(random.Random(seed))
        assert instruction and len(output.split()) >= 15
        for lhs, rhs in equations(output):
            assert abs(lhs - rhs) <= max(0.011, 1e-4 * abs(rhs)), (lhs, rhs, output)


def test_loan_payment_matches_formula() -> None:
    for seed in range(200):
        text = demo_data._f_loan(random.Random(seed))[2]
        p = float(re.search(r"Next, (\d+) \*", text).group(1))
        r = float(re.search(r"r = [\d.]+ / 12 = ([\d.]+)", text).group(1))
        n = int(re.search(r"n = \d+ \* 12 = (\d+)", text).group(1))
        pay = float(re.search(r"Monthly payment: \$([\d,]+\.\d\d)", text).group(1).replace(",", ""))
        exact = p * r * (1 + r) ** n / ((1 + r) ** n - 1)
        assert abs(pay - exact) <= 0.0051, (pay, exact)


# --------------------------------------------------------------------------- code


def run_examples(rec: dict) -> int:
    """Compile and exec every fenced block of a record, then check its example calls."""
    blocks = FENCE.findall(rec["input"]) + FENCE.findall(rec["output"])
    assert blocks, rec
    namespace: dict[str, Any] = {}
    for block in blocks:
        exec(compile(block, rec.get("id", "<demo>"), "exec"), namespace)
    examples = EXAMPLE.findall(rec["output"])
    for call, expected in examples:
        got = eval(call, namespace)
        assert close(got, ast.literal_eval(expected)), (call, got, expected)
    return len(examples)


def test_code_outputs_compile_and_run(corpus: list[dict]) -> None:
    for r in by_domain(corpus, "code", "finance_code"):
        assert len(FENCE.findall(r["output"])) == 1
        assert run_examples(r) == 1
    for r in by_domain(corpus, "code_story"):
        assert run_examples(r) == 1


@pytest.mark.parametrize(
    "template",
    demo_data._CODE_TEMPLATES + demo_data._FIN_CODE_TEMPLATES,
    ids=lambda t: t.__name__,
)
def test_code_templates(template) -> None:
    for seed in range(30):
        task = template(random.Random(seed))
        namespace: dict[str, Any] = {}
        exec(compile(task.code, task.name, "exec"), namespace)
        got = namespace[task.name](*copy.deepcopy(task.args))
        assert close(got, task.expected), (task.call, got, task.expected)
        assert task.how.startswith("It ")


def test_finance_code_independent_values() -> None:
    """Spot-check finance functions against textbook values, not the generator's reference."""
    ns: dict[str, Any] = {}
    for template in demo_data._FIN_CODE_TEMPLATES:
        task = template(random.Random(0))
        exec(task.code, ns)
        ns[template.__name__] = ns[task.name]
    assert ns["_fc_compound"](1000, 0.05, 10, 1) == 1628.89
    assert ns["_fc_payment"](200000, 0.06, 30) == 1199.10
    assert ns["_fc_simple"](1000, 0.05, 3) == 150.0
    assert ns["_fc_roi"](1000, 1250) == 25.0
    assert ns["_fc_double"](0.07) == 11
    assert ns["_fc_npv"](0.1, [-1000, 1100]) == 0.0
    assert ns["_fc_break_even"](1000, 15, 5) == 100
    assert ns["_fc_budget"](1000) == {"needs": 500.0, "wants": 300.0, "savings": 200.0}
