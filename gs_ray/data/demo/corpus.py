"""A built-in, deterministically generated instruction corpus for running without downloads.

The GradientSpace paper trains on a "Data Mix" of instruction sets (math reasoning, code, finance,
creative writing). This module imitates such a mix with template-based generators, so that the
project's main job can run with no arguments and no network:

* ``math`` - grade-school word problems with worked, step-by-step answers whose arithmetic is
  correct (every step is written ``a op b = c``), ending in ``The answer is N.``;
* ``code`` - Python tasks; the output is a short, runnable function in a fenced ``python`` block
  plus an explanation and a worked example call (``` `f(x)` returns `y` ```);
* ``finance`` - interest, loans, ROI, budgeting and explanations of terms (P/E ratio,
  diversification, ...), always with a numeric example computed correctly;
* ``stories`` - short stories from prompts, composed from many templates, characters, places,
  objects and plot events;
* ``support`` - customer-support tickets (in ``input``) with a polite resolution.

About a sixth of the corpus is *cross-domain*, with its own labels: ``finance_code`` (a finance
computation asked for as a Python function), ``math_story`` (a word problem told as a story, the
solution woven in) and ``code_story`` (code explained as a story or in plain prose, or a story
whose character writes a small program). These items exist so that the domain label and the
learning behaviour do not coincide: a method that clusters by gradients should be able to group
samples by what the model has to learn, not by the surface topic. The ``domain`` field is metadata
for evaluation only; the method never reads it.

Everything is built from ``random.Random`` instances seeded from ``seed`` (no global random state,
no third-party packages), so the same ``(n_samples, seed)`` always yields the same corpus.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gs_ray.data.demo import words as W

BASE_DOMAINS: tuple[str, ...] = ("math", "code", "finance", "stories", "support")
CROSS_DOMAINS: tuple[str, ...] = ("finance_code", "math_story", "code_story")
DOMAINS: tuple[str, ...] = BASE_DOMAINS + CROSS_DOMAINS

# Share of each domain in the corpus (sums to 1); cross-domain items are 17 %.
_WEIGHTS: dict[str, float] = {
    "math": 0.19,
    "code": 0.19,
    "finance": 0.19,
    "stories": 0.19,
    "support": 0.07,
    "finance_code": 0.06,
    "math_story": 0.06,
    "code_story": 0.05,
}
_MAX_RETRIES = 25  # attempts to draw an item whose output is not already in the corpus

Record = dict[str, str]

# --------------------------------------------------------------------------- small helpers


def _record(instruction: str, input_: str, output: str, domain: str) -> Record:
    return {"instruction": instruction, "input": input_, "output": output, "domain": domain}


def _fmt(x: float, dp: int = 2) -> str:
    """A plain number for an equation: ``dp`` decimals at most, no trailing zeros, no commas."""
    s = f"{x:.{dp}f}"
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return "0" if s == "-0" else s


def _money(x: float) -> str:
    return f"${x:,.2f}"


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _lc(s: str) -> str:
    return s[:1].lower() + s[1:]


def _bare(noun: str) -> str:
    """'an old map' -> 'old map'."""
    return noun.split(" ", 1)[1] if noun.split(" ", 1)[0] in ("a", "an") else noun


def _the(noun: str) -> str:
    return "the " + _bare(noun)


def _third_person(phrase: str) -> str:
    """'count the vowels' -> 'counts the vowels' (first word only)."""
    verb, _, rest = phrase.partition(" ")
    if verb.endswith(("s", "sh", "ch", "x", "z", "o")):
        verb += "es"
    elif verb.endswith("y") and verb[-2:-1] not in "aeiou":
        verb = verb[:-1] + "ies"
    else:
        verb += "s"
    return f"{verb} {rest}".strip()


def _ask(rng: random.Random, question: str, asks: tuple[str, ...]) -> tuple[str, str]:
    """Put a question either in the instruction or, after a generic instruction, in the input."""
    if rng.random() < 0.5:
        return rng.choice(asks), question
    return question, ""


# =========================================================================== math


@dataclass(frozen=True)
class _Problem:
    """A word problem: facts, question, solution steps (one ``a op b = c`` each), answer."""

    setup: str
    question: str
    steps: tuple[str, ...]  # each starts with a common word, never a name or a number
    answer: int
    unit: str


def _m_shopping(rng: random.Random, who: str) -> _Problem:
    (item1, p_lo, p_hi), (item2, q_lo, q_hi) = rng.sample(W.SHOP_ITEMS, 2)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    p, q = rng.randint(p_lo, p_hi), rng.randint(q_lo, q_hi)
    x, y = a * p, b * q
    setup = (
        f"At {rng.choice(W.STORES)}, {who} buys {a} {item1} for ${p} each "
        f"and {b} {item2} for ${q} each."
    )
    question = rng.choice(
        [
            f"How much does {who} spend altogether?",
            "What is the total cost in dollars?",
            f"How many dollars does {who} pay in total?",
        ]
    )
    steps = (
        f"The {item1} cost {a} * {p} = {x} dollars.",
        f"The {item2} cost {b} * {q} = {y} dollars.",
        f"Together that is {x} + {y} = {x + y} dollars.",
    )
    return _Problem(setup, question, steps, x + y, "dollars")


def _m_change(rng: random.Random, who: str) -> _Problem:
    item = rng.choice(W.SHOP_ITEMS)
    n, p = rng.randint(2, 12), rng.randint(item[1], item[2])
    cost = n * p
    money = cost + rng.randint(1, 60)
    setup = f"{who} has ${money} and buys {n} {item[0]} that cost ${p} each."
    question = rng.choice(
        [f"How much money does {who} have left?", "How many dollars are left after shopping?"]
    )
    steps = (
        f"The {item[0]} cost {n} * {p} = {cost} dollars.",
        f"That leaves {money} - {cost} = {money - cost} dollars.",
    )
    return _Problem(setup, question, steps, money - cost, "dollars")


def _m_share(rng: random.Random, who: str) -> _Problem:
    verb, groups, things = rng.choice(
        [
            ("bakes", "trays", "cookies"),
            ("makes", "batches", "muffins"),
            ("folds", "plates", "dumplings"),
            ("picks", "baskets", "plums"),
            ("prints", "sheets", "stickers"),
            ("fills", "boxes", "crayons"),
        ]
    )
    b, c = rng.randint(2, 6), rng.randint(6, 24)
    total = b * c
    f = rng.choice([d for d in range(2, 13) if total % d == 0 and d < total])
    setup = f"{who} {verb} {b} {groups} of {c} {things} and shares them equally among {f} friends."
    question = rng.choice(
        [f"How many {things} does each friend get?", f"How many {things} go to each friend?"]
    )
    steps = (
        f"The total is {b} * {c} = {total} {things}.",
        f"Each friend gets {total} / {f} = {total // f} {things}.",
    )
    return _Problem(setup, question, steps, total // f, things)


def _m_distance(rng: random.Random, who: str) -> _Problem:
    verb, lo, hi = rng.choice(
        [("drives", 40, 110), ("cycles", 12, 30), ("rides a scooter", 20, 45)]
    )
    s1, s2 = rng.randint(lo, hi), rng.randint(lo, hi)
    h1, h2 = rng.randint(1, 4), rng.randint(1, 3)
    d1, d2 = s1 * h1, s2 * h2
    setup = (
        f"{who} {verb} at {s1} km/h for {h1} hours, takes a break, "
        f"and then continues at {s2} km/h for {h2} hours."
    )
    question = rng.choice(["How far does the whole trip cover?", f"How many km does {who} travel?"])
    steps = (
        f"The first part covers {s1} * {h1} = {d1} km.",
        f"The second part covers {s2} * {h2} = {d2} km.",
        f"Altogether that is {d1} + {d2} = {d1 + d2} km.",
    )
    return _Problem(setup, question, steps, d1 + d2, "km")


def _m_age(rng: random.Random, who: str) -> _Problem:
    a = rng.randint(6, 15)
    k = rng.randint(2, max(2, min(7, 85 // a)))
    y = rng.randint(2, 12)
    rel = rng.choice(["grandmother", "grandfather", "aunt", "uncle", "neighbour", "piano teacher"])
    setup = f"{who} is {a} years old. {who}'s {rel} is {k} times as old."
    question = f"How old will the {rel} be in {y} years?"
    steps = (
        f"The {rel} is {a} * {k} = {a * k} years old now.",
        f"In {y} years the {rel} will be {a * k} + {y} = {a * k + y}.",
    )
    return _Problem(setup, question, steps, a * k + y, "years old")


def _m_savings(rng: random.Random, who: str) -> _Problem:
    w, n = rng.randint(5, 40), rng.randint(4, 20)
    saved = w * n
    spend = rng.randint(5, saved - 1)
    thing = rng.choice(["bicycle helmet", "video game", "pair of boots", "telescope", "guitar"])
    setup = f"{who} saves ${w} every week for {n} weeks and then spends ${spend} on a {thing}."
    question = rng.choice(["How much money is left?", f"How many dollars does {who} still have?"])
    steps = (
        f"The savings come to {w} * {n} = {saved} dollars.",
        f"After buying the {thing}, {saved} - {spend} = {saved - spend} dollars remain.",
    )
    return _Problem(setup, question, steps, saved - spend, "dollars")


def _m_fence(rng: random.Random, who: str) -> _Problem:
    length, width, c = rng.randint(5, 30), rng.randint(3, 20), rng.randint(3, 15)
    half = length + width
    setup = (
        f"{who} wants to fence a rectangular garden that is {length} meters long and "
        f"{width} meters wide. Fencing costs ${c} per meter."
    )
    question = rng.choice(["How much will the fence cost?", "What is the total cost of fencing?"])
    steps = (
        f"The length and width add up to {length} + {width} = {half} meters.",
        f"The perimeter is 2 * {half} = {2 * half} meters.",
        f"The fence costs {2 * half} * {c} = {2 * half * c} dollars.",
    )
    return _Problem(setup, question, steps, 2 * half * c, "dollars")


def _m_tiles(rng: random.Random, who: str) -> _Problem:
    while True:
        length, width, k = rng.randint(3, 9), rng.randint(2, 8), rng.randint(2, 6)
        if (length * width) % k == 0:
            break
    area = length * width
    setup = (
        f"{who} is tiling a floor that measures {length} meters by {width} meters. "
        f"Each box of tiles covers {k} square meters."
    )
    question = rng.choice(["How many boxes are needed?", f"How many boxes must {who} buy?"])
    steps = (
        f"The floor area is {length} * {width} = {area} square meters.",
        f"That needs {area} / {k} = {area // k} boxes.",
    )
    return _Problem(setup, question, steps, area // k, "boxes")


def _m_discount(rng: random.Random, who: str) -> _Problem:
    price = 20 * rng.randint(2, 25)
    d = rng.choice([10, 15, 20, 25, 30, 35, 40, 45, 50])
    off = price * d // 100
    thing = rng.choice(["jacket", "lamp", "backpack", "tent", "coffee machine", "pair of skates"])
    setup = f"A {thing} costs ${price}. {who} buys it during a sale with {d}% off."
    question = rng.choice(["What is the sale price?", f"How much does {who} pay?"])
    steps = (
        f"The discount is {price} * {d} / 100 = {off} dollars.",
        f"The sale price is {price} - {off} = {price - off} dollars.",
    )
    return _Problem(setup, question, steps, price - off, "dollars")


def _m_fraction(rng: random.Random, who: str) -> _Problem:
    group, noun, bad, good = rng.choice(
        [
            ("class", "students", "absent", "present"),
            ("crate", "tomatoes", "bruised", "fine"),
            ("bus", "seats", "empty", "taken"),
            ("choir", "singers", "away on holiday", "singing"),
            ("box", "light bulbs", "broken", "working"),
        ]
    )
    k = rng.randint(2, 6)
    total = k * rng.randint(4, 10)
    part = total // k
    setup = f"{who} counts {total} {noun} in a {group}, and 1/{k} of them are {bad}."
    question = f"How many {noun} are {good}?"
    steps = (
        f"The {bad} ones number {total} / {k} = {part}.",
        f"That leaves {total} - {part} = {total - part} {noun} that are {good}.",
    )
    return _Problem(setup, question, steps, total - part, noun)


def _m_wages(rng: random.Random, who: str) -> _Problem:
    h, d, r = rng.randint(3, 9), rng.randint(3, 6), rng.randint(12, 30)
    job = rng.choice(["at a bakery", "at the library", "as a lifeguard", "at a bike shop"])
    setup = f"{who} works {job} for {h} hours a day, {d} days a week, and earns ${r} per hour."
    question = rng.choice(["How much is earned in one week?", f"What is {who}'s weekly pay?"])
    steps = (
        f"The total time is {h} * {d} = {h * d} hours.",
        f"The pay is {h * d} * {r} = {h * d * r} dollars.",
    )
    return _Problem(setup, question, steps, h * d * r, "dollars")


def _m_inventory(rng: random.Random, who: str) -> _Problem:
    goods = rng.choice(["umbrellas", "sandwiches", "postcards", "plants", "scarves", "mangoes"])
    start = rng.randint(60, 300)
    a = rng.randint(5, start // 2)
    b = rng.randint(5, start - a - 1)
    c = rng.randint(10, 120)
    x, y = start - a, start - a - b
    setup = (
        f"A shop run by {who} starts the day with {start} {goods}. It sells {a} in the morning "
        f"and {b} in the afternoon, then receives a delivery of {c}."
    )
    question = f"How many {goods} are in stock at closing time?"
    steps = (
        f"After the morning, {start} - {a} = {x} remain.",
        f"After the afternoon, {x} - {b} = {y} remain.",
        f"The delivery brings the stock to {y} + {c} = {y + c}.",
    )
    return _Problem(setup, question, steps, y + c, goods)


def _m_reading(rng: random.Random, who: str) -> _Problem:
    pages, r = rng.randint(120, 600), rng.randint(10, 40)
    d = rng.randint(2, max(2, pages // r - 1))
    setup = f"{who} is reading a book with {pages} pages and reads {r} pages every day."
    question = f"How many pages are left after {d} days?"
    steps = (
        f"In {d} days that is {r} * {d} = {r * d} pages.",
        f"The pages left are {pages} - {r * d} = {pages - r * d}.",
    )
    return _Problem(setup, question, steps, pages - r * d, "pages")


def _m_unit_rate(rng: random.Random, who: str) -> _Problem:
    item = rng.choice(["pencils", "stamps", "plant pots", "batteries", "bars of soap", "mugs"])
    n, u, k = rng.randint(2, 8), rng.randint(2, 15), rng.randint(3, 15)
    setup = f"{n} {item} cost ${n * u} in total, and {who} needs {k} of them."
    question = rng.choice([f"How much will {k} {item} cost?", f"What does {who} pay for {k}?"])
    steps = (
        f"The price of one is {n * u} / {n} = {u} dollars.",
        f"Buying {k} costs {u} * {k} = {u * k} dollars.",
    )
    return _Problem(setup, question, steps, u * k, "dollars")


def _m_tickets(rng: random.Random, who: str) -> _Problem:
    adult = rng.randint(8, 30)
    child = rng.randint(4, adult - 1)
    a, c = rng.randint(2, 4), rng.randint(2, 6)
    venue = rng.choice(["the zoo", "a museum", "the aquarium", "a theme park", "the planetarium"])
    setup = (
        f"Tickets for {venue} cost ${adult} for adults and ${child} for children. "
        f"{who} buys tickets for {a} adults and {c} children."
    )
    question = rng.choice(["What is the total price?", f"How much does {who} pay?"])
    steps = (
        f"The adult tickets cost {a} * {adult} = {a * adult} dollars.",
        f"The child tickets cost {c} * {child} = {c * child} dollars.",
        f"The total is {a * adult} + {c * child} = {a * adult + c * child} dollars.",
    )
    return _Problem(setup, question, steps, a * adult + c * child, "dollars")


def _m_weekly(rng: random.Random, who: str) -> _Problem:
    verb, unit, lo, hi = rng.choice(
        [
            ("runs", "km", 2, 12),
            ("cycles", "km", 5, 30),
            ("swims", "laps", 10, 40),
            ("practises the piano for", "minutes", 15, 60),
        ]
    )
    x, y, z = (rng.randint(lo, hi) for _ in range(3))
    w = rng.randint(2, 8)
    s = x + y + z
    setup = f"Every week {who} {verb} {x} {unit} on Monday, {y} on Wednesday and {z} on Friday."
    question = f"How many {unit} is that in {w} weeks?"
    steps = (
        f"Each week the total is {x} + {y} + {z} = {s} {unit}.",
        f"Over {w} weeks that is {s} * {w} = {s * w} {unit}.",
    )
    return _Problem(setup, question, steps, s * w, unit)


_MATH_TEMPLATES: tuple[Callable[[random.Random, str], _Problem], ...] = (
    _m_shopping,
    _m_change,
    _m_share,
    _m_distance,
    _m_age,
    _m_savings,
    _m_fence,
    _m_tiles,
    _m_discount,
    _m_fraction,
    _m_wages,
    _m_inventory,
    _m_reading,
    _m_unit_rate,
    _m_tickets,
    _m_weekly,
)


def _format_steps(rng: random.Random, steps: tuple[str, ...]) -> str:
    style = rng.randrange(3)
    if style == 0:
        return "\n".join(f"Step {i}: {s}" for i, s in enumerate(steps, 1))
    if style == 1:
        intro = rng.choice(["Let's work it out.", f"We can solve this in {len(steps)} steps."])
        return intro + "\n" + "\n".join(f"{i}. {s}" for i, s in enumerate(steps, 1))
    return " ".join(steps)


def _math_item(
    rng: random.Random, template: Callable[[random.Random, str], _Problem] | None = None
) -> tuple[Record, int]:
    """One ``math`` record and its expected final answer (used by the tests)."""
    template = template or rng.choice(_MATH_TEMPLATES)
    prob = template(rng, rng.choice(W.NAMES))
    text = f"{prob.setup} {prob.question}"
    instruction, input_ = _ask(rng, text, W.MATH_ASKS)
    if not input_:
        instruction += rng.choice(W.MATH_SUFFIXES)
    output = f"{_format_steps(rng, prob.steps)}\nThe answer is {prob.answer}."
    return _record(instruction, input_, output, "math"), prob.answer


# =========================================================================== finance


def _f_simple_interest(rng: random.Random) -> tuple[str, str, str]:
    who = rng.choice(W.NAMES)
    p, r, t = rng.randrange(1000, 20001, 250), rng.choice(W.RATES), rng.randint(2, 10)
    dec = _fmt(r / 100, 4)
    yearly = round(p * float(dec), 2)
    interest = round(yearly * t, 2)
    total = round(p + interest, 2)
    q = rng.choice(
        [
            f"{who} deposits {_money(p)} in an account paying {_fmt(r)}% simple interest per year. "
            f"How much interest is earned in {t} years, and what is the final balance?",
            f"What is the simple interest on {_money(p)} at {_fmt(r)}% a year for {t} years?",
        ]
    )
    out = (
        "Simple interest is principal x rate x time; interest is never earned on interest. "
        f"Each year the deposit earns {p} * {dec} = {_fmt(yearly)}. "
        f"Over {t} years that is {_fmt(yearly)} * {t} = {_fmt(interest)}. "
        f"The balance becomes {p} + {_fmt(interest)} = {_fmt(total)}, so the interest is "
        f"{_money(interest)} and the final balance {_money(total)}."
    )
    return *_ask(rng, q, W.FIN_ASKS), out


def _f_compound(rng: random.Random) -> tuple[str, str, str]:
    who = rng.choice(W.NAMES)
    p, r = rng.randrange(1000, 50001, 500), rng.choice(W.RATES)
    dec = r / 100
    if rng.random() < 0.4:
        t = rng.randint(1, 10)
        n = 12 * t
        rate_s = _fmt(dec / 12, 8)
        how = "compounded monthly"
        first = (
            f"The monthly rate is {_fmt(dec, 4)} / 12 = {rate_s}, and there are "
            f"{t} * 12 = {n} periods. "
        )
    else:
        t = rng.randint(2, 15)
        n, rate_s, how, first = t, _fmt(dec, 4), "compounded yearly", ""
    factor = _fmt((1 + float(rate_s)) ** n, 6)
    final = round(p * float(factor), 2)
    gain = round(final - p, 2)
    q = rng.choice(
        [
            f"{who} invests {_money(p)} at {_fmt(r)}% interest {how}. What is it worth after {t} "
            "years?",
            f"How much will {_money(p)} grow to in {t} years at {_fmt(r)}% a year, {how}?",
        ]
    )
    out = (
        f"Compound interest grows the balance by a factor (1 + rate) each period. {first}"
        f"The growth factor is {_fmt(1 + float(rate_s), 8)} ^ {n} = {factor}. "
        f"The final value is {p} * {factor} = {_fmt(final)}, "
        f"so the interest earned is {_fmt(final)} - {p} = {_fmt(gain)}. "
        f"Answer: about {_money(final)}."
    )
    return *_ask(rng, q, W.FIN_ASKS), out


def _f_roi(rng: random.Random) -> tuple[str, str, str]:
    who = rng.choice(W.NAMES)
    asset = rng.choice(
        [
            "shares of an index fund",
            "a used camera to resell",
            "a batch of handmade candles",
            "a vintage guitar",
            "a small rental trailer",
            "shares of " + rng.choice(W.COMPANIES),
        ]
    )
    cost = rng.randrange(500, 20001, 50)
    value = round(cost * (1 + rng.uniform(-0.3, 0.8)))
    if value == cost:
        value += 37
    q = (
        f"{who} paid {_money(cost)} for {asset} and later sold for {_money(value)}. "
        "What was the ROI?"
    )
    if value > cost:
        diff = value - cost
        first = f"The gain is {value} - {cost} = {diff}. "
        verdict = "a gain"
    else:
        diff = cost - value
        first = f"The loss is {cost} - {value} = {diff}. "
        verdict = "a loss"
    ratio = _fmt(diff / cost, 4)
    pct = _fmt(float(ratio) * 100, 2)
    sign = "" if value > cost else "-"
    out = (
        f"Return on investment compares the profit with what was invested. {first}"
        f"Dividing by the cost gives {diff} / {cost} = {ratio}. "
        f"As a percentage, {ratio} * 100 = {pct}. The ROI is {sign}{pct}%, {verdict}."
    )
    return *_ask(rng, q, W.FIN_ASKS), out


def _f_loan(rng: random.Random) -> tuple[str, str, str]:
    kind, lo, hi, step, years_opts = rng.choice(
        [
            ("car loan", 5000, 40000, 500, (3, 4, 5, 6)),
            ("mortgage", 100000, 450000, 5000, (15, 20, 25, 30)),
            ("student loan", 8000, 60000, 1000, (5, 10, 15)),
            ("personal loan", 2000, 20000, 250, (2, 3, 4, 5)),
        ]
    )
    p, years = rng.randrange(lo, hi + 1, step), rng.choice(years_opts)
    rate = rng.choice((3.6, 4.2, 4.8, 5.4, 6.0, 6.6, 7.2, 7.8, 8.4, 9.0))
    r_s = _fmt(rate / 1200, 6)
    r = float(r_s)
    n = years * 12
    # Intermediates keep enough decimals that rounding them moves the payment by < 1 cent.
    f_s = _fmt((1 + r) ** n, 8)
    a_s = _fmt(p * r, 4)
    b_s = _fmt(float(a_s) * float(f_s), 4)
    c_s = _fmt(float(f_s) - 1, 8)
    pay = round(float(b_s) / float(c_s), 2)
    total = round(pay * n, 2)
    q = rng.choice(
        [
            f"What is the monthly payment on a {_money(p)} {kind} at {_fmt(rate)}% APR over "
            f"{years} years?",
            f"I'm taking a {kind} of {_money(p)} for {years} years at {_fmt(rate)}% a year. How "
            "much "
            "will I pay each month, and how much interest in total?",
        ]
    )
    out = (
        "For a fixed-rate loan, payment = P * r * f / (f - 1), where r is the monthly rate, "
        f"n the number of payments and f = (1 + r)^n. Here r = {_fmt(rate / 100, 4)} / 12 = {r_s} "
        f"and n = {years} * 12 = {n}. Then f = {_fmt(1 + r, 6)} ^ {n} = {f_s}. "
        f"Next, {p} * {r_s} = {a_s} and {a_s} * {f_s} = {b_s}, while "
        f"{f_s} - 1 = {c_s}. The payment is {b_s} / {c_s} = {_fmt(pay)}. "
        f"Over the loan you pay {_fmt(pay)} * {n} = {_fmt(total)}, of which "
        f"{_fmt(total)} - {p} = {_fmt(total - p)} is interest. Monthly payment: {_money(pay)}."
    )
    return *_ask(rng, q, W.FIN_ASKS), out


def _f_budget_rule(rng: random.Random) -> tuple[str, str, str]:
    who = rng.choice(W.NAMES)
    income = rng.randrange(2000, 9001, 100)
    needs, wants, save = (round(income * k, 2) for k in (0.5, 0.3, 0.2))
    q = rng.choice(
        [
            f"{who} takes home {_money(income)} a month. How should it be split under the "
            "50/30/20 budgeting rule?",
            f"Explain the 50/30/20 rule using a monthly income of {_money(income)}.",
        ]
    )
    out = (
        "The 50/30/20 rule splits after-tax income into needs (rent, groceries, insurance), wants "
        f"(dining out, hobbies) and savings or debt repayment. Needs: {income} * 0.5 = "
        f"{_fmt(needs)}. Wants: {income} * 0.3 = {_fmt(wants)}. Savings: {income} * 0.2 = "
        f"{_fmt(save)}. It is a starting point; adjust it if rent alone takes more than half."
    )
    return *_ask(rng, q, W.FIN_ASKS), out


def _f_monthly_budget(rng: random.Random) -> tuple[str, str, str]:
    who = rng.choice(W.NAMES)
    income = rng.randrange(2500, 7001, 50)
    rent = rng.randrange(int(income * 0.25), int(income * 0.4), 10)
    food, travel, bills = rng.randint(200, 700), rng.randint(50, 400), rng.randint(80, 250)
    spent = rent + food + travel + bills
    left = income - spent
    ratio = _fmt(left / income, 4)
    q = (
        f"{who} earns {_money(income)} a month after tax and spends {_money(rent)} on rent, "
        f"{_money(food)} on groceries, {_money(travel)} on transport and {_money(bills)} on "
        "utilities. How much is left, and what is the savings rate?"
    )
    out = (
        f"First add the expenses: {rent} + {food} + {travel} + {bills} = {spent}. "
        f"What is left is {income} - {spent} = {left}. The savings rate is the share of income "
        f"kept: {left} / {income} = {ratio}, and {ratio} * 100 = {_fmt(float(ratio) * 100)}. "
        f"So {who} can save about {_money(left)} a month, or {_fmt(float(ratio) * 100)}% of income."
    )
    return *_ask(rng, q, W.FIN_ASKS), out


def _f_pe_ratio(rng: random.Random) -> tuple[str, str, str]:
    company = rng.choice(W.COMPANIES)
    eps = round(rng.uniform(0.5, 20), 2)
    price = round(eps * rng.uniform(6, 45), 2)
    pe = round(price / eps, 2)
    avg = rng.randint(12, 30)
    instr = rng.choice(
        [
            "What is a P/E ratio? Explain it with an example.",
            f"Explain the price-to-earnings ratio using {company} as an example.",
            "How do I read a stock's P/E ratio?",
        ]
    )
    inp = f"{company}: share price {_money(price)}, earnings per share {_money(eps)}."
    view = (
        "investors are paying more for each dollar of profit, often because they expect growth"
        if pe > avg
        else "the stock looks cheap relative to its earnings, which may signal value or doubts"
    )
    out = (
        "The price-to-earnings (P/E) ratio divides the share price by the earnings per share. "
        f"For {company}, {_fmt(price)} / {_fmt(eps)} = {_fmt(pe)}, so buyers pay about "
        f"{_money(pe)} for every $1 of annual earnings. Compared with a sector average of {avg}, "
        f"{view}. Compare P/E ratios only between similar companies."
    )
    return instr, inp, out


def _f_diversification(rng: random.Random) -> tuple[str, str, str]:
    k = rng.choice([3, 4, 5, 6])
    total = k * rng.randrange(1000, 12001, 100)
    each = total // k
    d = rng.choice([20, 30, 40, 50])
    loss = each * d // 100
    frac = _fmt(loss / total, 4)
    instr = rng.choice(
        [
            "Explain diversification with a numeric example.",
            "Why shouldn't I put all my savings into one stock?",
            "What does it mean to diversify a portfolio?",
        ]
    )
    inp = rng.choice(["", f"Assume I have {_money(total)} to invest."])
    out = (
        "Diversification means spreading money across investments that do not all move together, "
        f"so one bad result cannot sink the whole portfolio. Split {_money(total)} across {k} "
        f"funds: {total} / {k} = {each} each. If one fund falls {d}%, the loss is {each} * "
        f"{_fmt(d / 100)} = {loss}, which is {loss} / {total} = {frac} of the portfolio, or "
        f"{frac} * 100 = {_fmt(float(frac) * 100)}%. With everything in that fund, you would lose "
        f"the full {d}%."
    )
    return instr, inp, out


def _f_inflation(rng: random.Random) -> tuple[str, str, str]:
    thing = rng.choice(
        [
            "a weekly grocery basket",
            "a monthly bus pass",
            "a pair of shoes",
            "a year of gym membership",
            "a family dinner out",
        ]
    )
    price = rng.randrange(20, 1501)
    i, n = rng.choice([2, 2.5, 3, 4, 5, 6]), rng.randint(3, 20)
    rate_s = _fmt(1 + i / 100, 4)
    f = _fmt(float(rate_s) ** n, 6)
    future = round(price * float(f), 2)
    power = round(100 / float(f), 2)
    q = (
        f"If {thing} costs {_money(price)} today and inflation averages {_fmt(i)}% a year, what "
        f"will it cost in {n} years?"
    )
    out = (
        f"Prices grow by a factor of {rate_s} each year, so over {n} years the factor is "
        f"{rate_s} ^ {n} = {f}. The future price is {price} * {f} = {_fmt(future)}, about "
        f"{_money(future)}. Put the other way, $100 today will buy only 100 / {f} = "
        f"{_fmt(power)} dollars' worth of today's goods."
    )
    return *_ask(rng, q, W.FIN_ASKS), out


def _f_savings_goal(rng: random.Random) -> tuple[str, str, str]:
    who = rng.choice(W.NAMES)
    goal_name = rng.choice(
        [
            "a trip to Japan",
            "a new laptop",
            "a house deposit",
            "a used car",
            "a wedding",
            "an emergency cushion",
        ]
    )
    m, months, have = rng.randrange(50, 801, 25), rng.randint(4, 36), rng.randrange(0, 2001, 100)
    goal = have + m * months
    need = goal - have
    q = (
        f"{who} wants to save {_money(goal)} for {goal_name}, already has {_money(have)}, and can "
        f"put aside {_money(m)} a month. How long will it take?"
    )
    out = (
        f"Subtract what is already saved: {goal} - {have} = {need}. Divide the remaining amount "
        f"by the monthly saving: {need} / {m} = {months}. So it takes {months} months. "
        "Automating the transfer on payday makes the plan easier to keep."
    )
    return *_ask(rng, q, W.FIN_ASKS), out


def _f_dividend(rng: random.Random) -> tuple[str, str, str]:
    company = rng.choice(W.COMPANIES)
    price = round(rng.uniform(20, 300), 2)
    div = round(price * rng.uniform(0.01, 0.07), 2)
    shares = rng.randint(10, 500)
    y = _fmt(div / price, 4)
    income = round(shares * div, 2)
    q = (
        f"{company} pays an annual dividend of {_money(div)} per share and trades at "
        f"{_money(price)}. What is the dividend yield, and what would {shares} shares pay per year?"
    )
    out = (
        "Dividend yield is the annual dividend divided by the share price. "
        f"Here {_fmt(div)} / {_fmt(price)} = {y}, and {y} * 100 = {_fmt(float(y) * 100)}, so the "
        f"yield is {_fmt(float(y) * 100)}%. Holding {shares} shares pays {shares} * {_fmt(div)} = "
        f"{_fmt(income)} a year, about {_money(income)}. A very high yield can mean the market "
        "doubts the dividend will last."
    )
    return *_ask(rng, q, W.FIN_ASKS), out


def _f_rule_of_72(rng: random.Random) -> tuple[str, str, str]:
    r = rng.choice([2, 3, 4, 4.5, 6, 8, 9, 12])
    years = round(72 / r)
    amount = rng.randrange(1000, 50001, 1000)
    check = _fmt((1 + r / 100) ** years, 6)
    exact = math.log(2) / math.log(1 + r / 100)
    instr = rng.choice(
        [
            "What is the rule of 72 and how do I use it?",
            f"How long does it take money to double at {_fmt(r)}% a year?",
            "Explain the rule of 72 with an example.",
        ]
    )
    inp = rng.choice(["", f"Say I invest {_money(amount)} at {_fmt(r)}% per year."])
    out = (
        "The rule of 72 estimates doubling time: divide 72 by the annual rate in percent. "
        f"At {_fmt(r)}%, 72 / {_fmt(r)} = {years} years. Check: {_fmt(1 + r / 100, 4)} ^ {years} "
        f"= {check}, close to 2. The exact time is about {exact:.1f} years, so {_money(amount)} "
        f"would grow to roughly {_money(2 * amount)} in that time."
    )
    return instr, inp, out


def _f_emergency_fund(rng: random.Random) -> tuple[str, str, str]:
    who = rng.choice(W.NAMES)
    expenses, k = rng.randrange(1500, 5001, 50), rng.choice([3, 4, 6])
    target = expenses * k
    have = rng.randrange(0, target // 2, 100)
    c = rng.randrange(100, 801, 50)
    gap = target - have
    months = round(gap / c, 2)
    q = (
        f"{who}'s essential expenses are {_money(expenses)} a month. How big should a {k}-month "
        f"emergency fund be, and how long to build it from {_money(have)} saving {_money(c)} "
        "a month?"
    )
    out = (
        "An emergency fund covers essential costs if income stops. "
        f"The target is {expenses} * {k} = {target}. Still needed: {target} - {have} = {gap}. "
        f"At {_money(c)} a month, {gap} / {c} = {_fmt(months)} months, so plan for "
        f"{math.ceil(months)} months. Keep it in an easy-access savings account."
    )
    return *_ask(rng, q, W.FIN_ASKS), out


def _f_credit_card(rng: random.Random) -> tuple[str, str, str]:
    apr = rng.choice([15, 18, 19.2, 21, 22.8, 24, 26.4])
    monthly = _fmt(apr / 12, 2)
    balance = rng.randrange(300, 8001, 10)
    dec = _fmt(float(monthly) / 100, 4)
    interest = round(balance * float(dec), 2)
    q = (
        f"My credit card has a {_fmt(apr)}% APR and I carry a {_money(balance)} balance. How "
        "much interest is charged in a month?"
    )
    out = (
        "Card interest is usually charged monthly at APR / 12. "
        f"Here {_fmt(apr)} / 12 = {monthly}% per month. On the balance, {balance} * {dec} = "
        f"{_fmt(interest)}, so about {_money(interest)} of interest this month. Over a year "
        f"that is roughly {_fmt(interest)} * 12 = {_fmt(interest * 12)} if the balance stays. "
        "Paying in full each month avoids it."
    )
    return *_ask(rng, q, W.FIN_ASKS), out


def _f_net_worth(rng: random.Random) -> tuple[str, str, str]:
    who = rng.choice(W.NAMES)
    assets = rng.sample(
        [
            ("savings", 1000, 30000),
            ("retirement account", 5000, 120000),
            ("car", 3000, 25000),
            ("home", 150000, 500000),
        ],
        3,
    )
    debts = rng.sample(
        [
            ("car loan", 2000, 15000),
            ("student loan", 5000, 40000),
            ("credit card", 300, 6000),
            ("mortgage", 50000, 140000),
        ],
        2,
    )
    a_vals = [rng.randrange(lo, hi, 100) for _, lo, hi in assets]
    d_vals = [rng.randrange(lo, hi, 100) for _, lo, hi in debts]
    a_sum, d_sum = sum(a_vals), sum(d_vals)
    if a_sum <= d_sum:
        a_vals[0] += d_sum - a_sum + 1000
        a_sum = sum(a_vals)
    listing = ", ".join(f"{name} {_money(v)}" for (name, _, _), v in zip(assets, a_vals))
    owing = ", ".join(f"{name} {_money(v)}" for (name, _, _), v in zip(debts, d_vals))
    instr = rng.choice(
        [
            "What is net worth, and how do I calculate it?",
            f"Calculate {who}'s net worth and explain the idea.",
        ]
    )
    inp = f"Assets: {listing}. Debts: {owing}."
    out = (
        "Net worth is everything you own minus everything you owe. "
        f"Assets: {' + '.join(map(str, a_vals))} = {a_sum}. "
        f"Debts: {' + '.join(map(str, d_vals))} = {d_sum}. "
        f"Net worth: {a_sum} - {d_sum} = {a_sum - d_sum}, or {_money(a_sum - d_sum)}. "
        "Tracking it once a year shows whether saving and debt repayment are working."
    )
    return instr, inp, out


def _f_break_even(rng: random.Random) -> tuple[str, str, str]:
    biz, thing = rng.choice(
        [
            ("a food truck", "tacos"),
            ("a small bakery", "loaves"),
            ("a print shop", "posters"),
            ("a candle maker", "candles"),
            ("a lemonade stand", "cups"),
            ("a pottery studio", "mugs"),
        ]
    )
    variable = rng.randint(1, 20)
    price = variable + rng.randint(2, 25)
    margin = price - variable
    units = rng.randint(50, 900)
    fixed = margin * units
    q = (
        f"{_cap(biz)} has fixed costs of {_money(fixed)} a month and sells {thing} for "
        f"{_money(price)} each, with a variable cost of {_money(variable)} each. How many must it "
        "sell to break even?"
    )
    out = (
        "Break-even is where the contribution from each sale covers the fixed costs. "
        f"Each sale contributes {price} - {variable} = {margin}. "
        f"Then {fixed} / {margin} = {units}, "
        f"so {_the(biz)} must sell {units} {thing} a month; every sale beyond that is profit."
    )
    return *_ask(rng, q, W.FIN_ASKS), out


_FINANCE_TEMPLATES: tuple[Callable[[random.Random], tuple[str, str, str]], ...] = (
    _f_simple_interest,
    _f_compound,
    _f_roi,
    _f_loan,
    _f_budget_rule,
    _f_monthly_budget,
    _f_pe_ratio,
    _f_diversification,
    _f_inflation,
    _f_savings_goal,
    _f_dividend,
    _f_rule_of_72,
    _f_emergency_fund,
    _f_credit_card,
    _f_net_worth,
    _f_break_even,
)


def _finance_item(rng: random.Random) -> Record:
    return _record(*rng.choice(_FINANCE_TEMPLATES)(rng), "finance")


# =========================================================================== code


@dataclass(frozen=True)
class _CodeTask:
    """A small Python function with a worked example (``name(*args) == expected``)."""

    goal: str  # infinitive phrase: "count the vowels in a string"
    code: str
    name: str
    args: tuple[Any, ...]
    expected: Any
    how: str  # one sentence starting with "It "

    @property
    def call(self) -> str:
        return f"{self.name}({', '.join(repr(a) for a in self.args)})"

    @property
    def signature(self) -> str:
        line = next(ln for ln in self.code.splitlines() if ln.startswith("def "))
        return line[4:].rstrip(":")


def _phrase(rng: random.Random, lo: int = 2, hi: int = 5) -> str:
    return " ".join(rng.sample(W.WORDS, rng.randint(lo, hi))).capitalize()


def _ints(rng: random.Random, lo: int, hi: int, n_lo: int = 4, n_hi: int = 8) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(rng.randint(n_lo, n_hi))]


def _c_count_vowels(rng: random.Random) -> _CodeTask:
    name = rng.choice(["count_vowels", "vowel_count", "num_vowels"])
    s = rng.choice(["text", "s", "sentence", "word"])
    if rng.random() < 0.5:
        code = (
            f"def {name}({s}: str) -> int:\n"
            f'    """Return how many vowels appear in {s}, ignoring case."""\n'
            f'    return sum(1 for ch in {s}.lower() if ch in "aeiou")\n'
        )
        how = 'It lower-cases the text and counts the characters found in "aeiou".'
    else:
        code = (
            f"def {name}({s}):\n"
            "    count = 0\n"
            f"    for ch in {s}.lower():\n"
            '        if ch in "aeiou":\n'
            "            count += 1\n"
            "    return count\n"
        )
        how = "It walks through the lower-cased text and adds one for every vowel it meets."
    arg = _phrase(rng)
    expected = sum(ch in "aeiou" for ch in arg.lower())
    return _CodeTask(
        "count the vowels in a string, ignoring case", code, name, (arg,), expected, how
    )


def _c_reverse_words(rng: random.Random) -> _CodeTask:
    name = rng.choice(["reverse_words", "reversed_sentence", "flip_words"])
    p = rng.choice(["sentence", "text", "line"])
    if rng.random() < 0.5:
        body = f'    return " ".join(reversed({p}.split()))\n'
    else:
        body = f"    words = {p}.split()\n" + '    return " ".join(words[::-1])\n'
    code = f"def {name}({p}: str) -> str:\n{body}"
    arg = _phrase(rng, 3, 6).lower()
    how = "It splits on whitespace, reverses the list of words and joins them with single spaces."
    return _CodeTask(
        "reverse the order of the words in a sentence",
        code,
        name,
        (arg,),
        " ".join(reversed(arg.split())),
        how,
    )


def _c_palindrome(rng: random.Random) -> _CodeTask:
    name = rng.choice(["is_palindrome", "reads_same_backwards", "check_palindrome"])
    p = rng.choice(["text", "phrase", "s"])
    if rng.random() < 0.5:
        code = (
            f"def {name}({p}: str) -> bool:\n"
            f"    cleaned = [ch.lower() for ch in {p} if ch.isalnum()]\n"
            "    return cleaned == cleaned[::-1]\n"
        )
        how = "It keeps letters and digits, lower-cased, and compares the list with its reverse."
    else:
        code = (
            f"def {name}({p}: str) -> bool:\n"
            f"    chars = [ch.lower() for ch in {p} if ch.isalnum()]\n"
            "    left, right = 0, len(chars) - 1\n"
            "    while left < right:\n"
            "        if chars[left] != chars[right]:\n"
            "            return False\n"
            "        left += 1\n"
            "        right -= 1\n"
            "    return True\n"
        )
        how = "It compares characters from both ends, moving inwards, and stops at a mismatch."
    arg = rng.choice(W.PALINDROMES) if rng.random() < 0.5 else _phrase(rng, 1, 3)
    cleaned = [ch.lower() for ch in arg if ch.isalnum()]
    return _CodeTask(
        "check whether a string is a palindrome, ignoring case, spaces and punctuation",
        code,
        name,
        (arg,),
        cleaned == cleaned[::-1],
        how,
    )


def _c_chunk(rng: random.Random) -> _CodeTask:
    name = rng.choice(["chunk", "chunked", "split_into_chunks", "batch"])
    seq, size = rng.choice(["items", "values", "seq"]), rng.choice(["size", "n", "chunk_size"])
    code = (
        f"def {name}({seq}: list, {size}: int) -> list[list]:\n"
        f'    """Split {seq} into consecutive chunks of length {size}."""\n'
        f"    if {size} <= 0:\n"
        f'        raise ValueError("{size} must be positive")\n'
        f"    return [{seq}[i:i + {size}] for i in range(0, len({seq}), {size})]\n"
    )
    data, k = _ints(rng, 0, 99, 5, 9), rng.randint(2, 4)
    expected = [data[i : i + k] for i in range(0, len(data), k)]
    how = f"It slices the list in steps of `{size}`; the last chunk may be shorter."
    return _CodeTask(
        "split a list into chunks of a given size", code, name, (data, k), expected, how
    )


def _c_top_k(rng: random.Random) -> _CodeTask:
    name = rng.choice(["top_k", "largest_n", "n_largest"])
    vals = rng.choice(["values", "numbers", "scores"])
    if rng.random() < 0.5:
        code = (
            f"def {name}({vals}: list[float], k: int) -> list[float]:\n"
            f"    return sorted({vals}, reverse=True)[:k]\n"
        )
        how = "It sorts a copy in descending order and keeps the first k items."
    else:
        code = (
            "import heapq\n\n\n"
            f"def {name}({vals}: list[float], k: int) -> list[float]:\n"
            f"    return heapq.nlargest(k, {vals})\n"
        )
        how = "It uses heapq.nlargest, which avoids sorting the whole list when k is small."
    data, k = _ints(rng, 1, 200, 5, 9), rng.randint(1, 4)
    expected = sorted(data, reverse=True)[:k]
    return _CodeTask(
        "return the k largest numbers from a list, biggest first",
        code,
        name,
        (data, k),
        expected,
        how,
    )


def _c_word_counts(rng: random.Random) -> _CodeTask:
    name = rng.choice(["word_counts", "count_words", "word_frequencies"])
    if rng.random() < 0.5:
        code = (
            f"def {name}(text: str) -> dict[str, int]:\n"
            "    counts = {}\n"
            "    for word in text.lower().split():\n"
            "        counts[word] = counts.get(word, 0) + 1\n"
            "    return counts\n"
        )
        how = "It lower-cases the text, splits it into words and tallies them in a dictionary."
    else:
        code = (
            "from collections import Counter\n\n\n"
            f"def {name}(text: str) -> dict[str, int]:\n"
            "    return dict(Counter(text.lower().split()))\n"
        )
        how = "It lets collections.Counter tally the lower-cased words and returns a plain dict."
    pool = rng.sample(W.WORDS, 3)
    arg = " ".join(rng.choice(pool) for _ in range(rng.randint(5, 8)))
    expected: dict[str, int] = {}
    for w in arg.split():
        expected[w] = expected.get(w, 0) + 1
    return _CodeTask(
        "count how often each word occurs in a text", code, name, (arg,), expected, how
    )


def _c_fizzbuzz(rng: random.Random) -> _CodeTask:
    name = rng.choice(["fizzbuzz", "fizz_buzz_list", "word_game", "ping_pong"])
    w1, w2 = rng.choice(
        [("Fizz", "Buzz"), ("Ping", "Pong"), ("Foo", "Bar"), ("Tick", "Tock"), ("Zip", "Zap")]
    )
    a, b = rng.sample(range(2, 8), 2)
    code = (
        f"def {name}(n: int) -> list[str]:\n"
        "    result = []\n"
        "    for i in range(1, n + 1):\n"
        '        word = ""\n'
        f"        if i % {a} == 0:\n"
        f'            word += "{w1}"\n'
        f"        if i % {b} == 0:\n"
        f'            word += "{w2}"\n'
        "        result.append(word or str(i))\n"
        "    return result\n"
    )
    n = rng.randint(6, 12)
    expected = [(w1 * (i % a == 0) + w2 * (i % b == 0)) or str(i) for i in range(1, n + 1)]
    return _CodeTask(
        f"list the numbers 1 to n, saying {w1} for multiples of {a}, {w2} for multiples of {b} "
        "and both for multiples of both",
        code,
        name,
        (n,),
        expected,
        "It builds each entry from the words whose divisor divides i, falling back to the number.",
    )


def _c_flatten(rng: random.Random) -> _CodeTask:
    name = rng.choice(["flatten", "flatten_once", "merge_sublists"])
    p = rng.choice(["nested", "lists", "groups"])
    if rng.random() < 0.5:
        code = (
            f"def {name}({p}: list[list]) -> list:\n"
            f"    return [item for sub in {p} for item in sub]\n"
        )
        how = "It uses a nested comprehension that visits each sub-list in order."
    else:
        code = (
            f"def {name}({p}: list[list]) -> list:\n"
            "    flat = []\n"
            f"    for sub in {p}:\n"
            "        flat.extend(sub)\n"
            "    return flat\n"
        )
        how = "It extends one result list with every sub-list in turn."
    arg = [_ints(rng, 0, 9, 0, 3) for _ in range(rng.randint(2, 4))]
    expected = [x for sub in arg for x in sub]
    return _CodeTask("flatten a list of lists by one level", code, name, (arg,), expected, how)


def _c_running_total(rng: random.Random) -> _CodeTask:
    name = rng.choice(["running_total", "cumulative_sum", "prefix_sums"])
    if rng.random() < 0.5:
        code = (
            f"def {name}(values: list[int]) -> list[int]:\n"
            "    totals, acc = [], 0\n"
            "    for v in values:\n"
            "        acc += v\n"
            "        totals.append(acc)\n"
            "    return totals\n"
        )
        how = "It keeps an accumulator and appends the sum so far after each element."
    else:
        code = (
            "from itertools import accumulate\n\n\n"
            f"def {name}(values: list[int]) -> list[int]:\n"
            "    return list(accumulate(values))\n"
        )
        how = "It relies on itertools.accumulate, which yields the sum so far at each position."
    arg = _ints(rng, 1, 20, 4, 7)
    expected = [sum(arg[: i + 1]) for i in range(len(arg))]
    return _CodeTask(
        "compute the running total of a list of numbers", code, name, (arg,), expected, how
    )


def _c_dedupe(rng: random.Random) -> _CodeTask:
    name = rng.choice(["unique_in_order", "dedupe", "remove_duplicates"])
    if rng.random() < 0.5:
        code = (
            f"def {name}(items: list) -> list:\n"
            "    seen, result = set(), []\n"
            "    for item in items:\n"
            "        if item not in seen:\n"
            "            seen.add(item)\n"
            "            result.append(item)\n"
            "    return result\n"
        )
        how = "It remembers what it has seen in a set and keeps only first occurrences."
    else:
        code = f"def {name}(items: list) -> list:\n    return list(dict.fromkeys(items))\n"
        how = "It uses dict.fromkeys, since dictionaries keep insertion order and unique keys."
    if rng.random() < 0.5:
        arg: list[Any] = _ints(rng, 1, 6, 5, 9)
    else:
        pool = rng.sample(W.WORDS, 3)
        arg = [rng.choice(pool) for _ in range(rng.randint(4, 7))]
    return _CodeTask(
        "remove duplicates from a list while keeping the original order",
        code,
        name,
        (arg,),
        list(dict.fromkeys(arg)),
        how,
    )


def _c_long_words(rng: random.Random) -> _CodeTask:
    name = rng.choice(["long_words", "words_longer_than", "filter_long_words"])
    k_name = rng.choice(["min_length", "limit", "n"])
    code = (
        f"def {name}(text: str, {k_name}: int) -> list[str]:\n"
        f"    return [w for w in text.split() if len(w) > {k_name}]\n"
    )
    arg, k = _phrase(rng, 4, 7).lower(), rng.randint(3, 6)
    expected = [w for w in arg.split() if len(w) > k]
    return _CodeTask(
        "return the words of a text that are longer than a given length",
        code,
        name,
        (arg, k),
        expected,
        "It splits the text on whitespace and keeps words whose length exceeds the limit.",
    )


def _c_fibonacci(rng: random.Random) -> _CodeTask:
    name = rng.choice(["fibonacci", "nth_fibonacci", "fib"])
    code = (
        f"def {name}(n: int) -> int:\n"
        f'    """Return the n-th Fibonacci number, with {name}(0) == 0."""\n'
        "    a, b = 0, 1\n"
        "    for _ in range(n):\n"
        "        a, b = b, a + b\n"
        "    return a\n"
    )
    n = rng.randint(5, 40)
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return _CodeTask(
        "compute the n-th Fibonacci number iteratively",
        code,
        name,
        (n,),
        a,
        "It keeps only the last two values and updates them n times, so it runs in linear time.",
    )


def _c_lcm(rng: random.Random) -> _CodeTask:
    name = rng.choice(["lcm", "least_common_multiple", "smallest_common_multiple"])
    if rng.random() < 0.5:
        code = (
            "from math import gcd\n\n\n"
            f"def {name}(a: int, b: int) -> int:\n"
            "    return a * b // gcd(a, b)\n"
        )
        how = "It divides the product by the greatest common divisor from the math module."
    else:
        code = (
            f"def {name}(a: int, b: int) -> int:\n"
            "    x, y = a, b\n"
            "    while y:\n"
            "        x, y = y, x % y\n"
            "    return a * b // x\n"
        )
        how = "It finds the greatest common divisor with Euclid's algorithm, then divides by it."
    a, b = rng.randint(2, 40), rng.randint(2, 40)
    return _CodeTask(
        "compute the least common multiple of two positive integers",
        code,
        name,
        (a, b),
        a * b // math.gcd(a, b),
        how,
    )


def _c_snake_to_camel(rng: random.Random) -> _CodeTask:
    name = rng.choice(["snake_to_camel", "to_camel_case", "camelize"])
    p = rng.choice(["name", "identifier", "snake"])
    code = (
        f"def {name}({p}: str) -> str:\n"
        f'    first, *rest = {p}.split("_")\n'
        '    return first + "".join(part.capitalize() for part in rest)\n'
    )
    parts = rng.sample(W.WORDS, rng.randint(2, 3))
    expected = parts[0] + "".join(x.capitalize() for x in parts[1:])
    return _CodeTask(
        "convert a snake_case identifier to camelCase",
        code,
        name,
        ("_".join(parts),),
        expected,
        "It splits on underscores, keeps the first part and capitalises the rest.",
    )


def _c_digit_sum(rng: random.Random) -> _CodeTask:
    name = rng.choice(["digit_sum", "sum_of_digits", "add_digits"])
    if rng.random() < 0.5:
        code = f"def {name}(n: int) -> int:\n    return sum(int(d) for d in str(abs(n)))\n"
        how = "It turns the number into a string and adds up the digits."
    else:
        code = (
            f"def {name}(n: int) -> int:\n"
            "    n, total = abs(n), 0\n"
            "    while n:\n"
            "        n, digit = divmod(n, 10)\n"
            "        total += digit\n"
            "    return total\n"
        )
        how = "It peels off the last digit with divmod until nothing is left."
    n = rng.randint(100, 999999)
    return _CodeTask(
        "add up the decimal digits of an integer",
        code,
        name,
        (n,),
        sum(int(d) for d in str(n)),
        how,
    )


def _c_primes(rng: random.Random) -> _CodeTask:
    name = rng.choice(["primes_up_to", "list_primes", "sieve"])
    code = (
        f"def {name}(limit: int) -> list[int]:\n"
        "    if limit < 2:\n"
        "        return []\n"
        "    is_prime = [True] * (limit + 1)\n"
        "    is_prime[0] = is_prime[1] = False\n"
        "    for i in range(2, int(limit ** 0.5) + 1):\n"
        "        if is_prime[i]:\n"
        "            for j in range(i * i, limit + 1, i):\n"
        "                is_prime[j] = False\n"
        "    return [i for i, flag in enumerate(is_prime) if flag]\n"
    )
    limit = rng.randint(10, 50)
    expected = [i for i in range(2, limit + 1) if all(i % d for d in range(2, i))]
    return _CodeTask(
        "list all prime numbers up to a limit",
        code,
        name,
        (limit,),
        expected,
        "It runs the sieve of Eratosthenes, crossing out multiples of each prime it finds.",
    )


def _c_rotate(rng: random.Random) -> _CodeTask:
    name = rng.choice(["rotate", "rotate_left", "shift_items"])
    code = (
        f"def {name}(items: list, k: int) -> list:\n"
        "    if not items:\n"
        "        return []\n"
        "    k %= len(items)\n"
        "    return items[k:] + items[:k]\n"
    )
    arg, k = _ints(rng, 0, 50, 4, 7), rng.randint(1, 9)
    kk = k % len(arg)
    return _CodeTask(
        "rotate a list to the left by k positions",
        code,
        name,
        (arg, k),
        arg[kk:] + arg[:kk],
        "It reduces k modulo the length and glues the two slices back together.",
    )


def _c_clamp(rng: random.Random) -> _CodeTask:
    name = rng.choice(["clamp_all", "clip_values", "bound_values"])
    code = (
        f"def {name}(values: list[int], low: int, high: int) -> list[int]:\n"
        "    return [min(max(v, low), high) for v in values]\n"
    )
    arg, low, high = _ints(rng, -10, 30, 4, 7), rng.randint(0, 5), rng.randint(10, 20)
    expected = [min(max(v, low), high) for v in arg]
    return _CodeTask(
        "clamp every number in a list into the range [low, high]",
        code,
        name,
        (arg, low, high),
        expected,
        "It raises each value to at least low and then caps it at high.",
    )


def _c_second_largest(rng: random.Random) -> _CodeTask:
    name = rng.choice(["second_largest", "runner_up", "second_max"])
    code = (
        f"def {name}(values: list[int]) -> int | None:\n"
        "    distinct = sorted(set(values), reverse=True)\n"
        "    return distinct[1] if len(distinct) > 1 else None\n"
    )
    arg = _ints(rng, 1, 30, 3, 8)
    distinct = sorted(set(arg), reverse=True)
    return _CodeTask(
        "find the second largest distinct value in a list, or None",
        code,
        name,
        (arg,),
        distinct[1] if len(distinct) > 1 else None,
        "It removes duplicates with a set, sorts descending and returns the second entry.",
    )


def _c_merge_sorted(rng: random.Random) -> _CodeTask:
    name = rng.choice(["merge_sorted", "merge_two_sorted", "merge_lists"])
    code = (
        f"def {name}(a: list[int], b: list[int]) -> list[int]:\n"
        "    i = j = 0\n"
        "    merged = []\n"
        "    while i < len(a) and j < len(b):\n"
        "        if a[i] <= b[j]:\n"
        "            merged.append(a[i])\n"
        "            i += 1\n"
        "        else:\n"
        "            merged.append(b[j])\n"
        "            j += 1\n"
        "    return merged + a[i:] + b[j:]\n"
    )
    a, b = sorted(_ints(rng, 0, 40, 2, 5)), sorted(_ints(rng, 0, 40, 2, 5))
    return _CodeTask(
        "merge two sorted lists into one sorted list",
        code,
        name,
        (a, b),
        sorted(a + b),
        "It walks both lists with two indices, always taking the smaller head, then adds the rest.",
    )


def _c_caesar(rng: random.Random) -> _CodeTask:
    name = rng.choice(["caesar_shift", "rotate_letters", "caesar_cipher"])
    code = (
        f"def {name}(text: str, shift: int) -> str:\n"
        "    result = []\n"
        "    for ch in text:\n"
        "        if ch.isalpha():\n"
        '            base = ord("a") if ch.islower() else ord("A")\n'
        "            result.append(chr((ord(ch) - base + shift) % 26 + base))\n"
        "        else:\n"
        "            result.append(ch)\n"
        '    return "".join(result)\n'
    )
    arg, shift = _phrase(rng, 1, 3), rng.randint(1, 25)
    expected = "".join(
        chr((ord(c) - (97 if c.islower() else 65) + shift) % 26 + (97 if c.islower() else 65))
        if c.isalpha()
        else c
        for c in arg
    )
    return _CodeTask(
        "apply a Caesar shift to the letters of a text",
        code,
        name,
        (arg, shift),
        expected,
        "It shifts each letter within its case, wrapping after z, and keeps other characters.",
    )


def _c_mean(rng: random.Random) -> _CodeTask:
    name = rng.choice(["mean_ignoring_none", "safe_average", "average_present"])
    code = (
        f"def {name}(values: list) -> float | None:\n"
        "    present = [v for v in values if v is not None]\n"
        "    if not present:\n"
        "        return None\n"
        "    return round(sum(present) / len(present), 2)\n"
    )
    arg: list[int | None] = [
        rng.randint(0, 100) if rng.random() < 0.75 else None for _ in range(rng.randint(4, 7))
    ]
    present = [v for v in arg if v is not None]
    expected = round(sum(present) / len(present), 2) if present else None
    return _CodeTask(
        "average a list of numbers, skipping missing values (None)",
        code,
        name,
        (arg,),
        expected,
        "It filters out None, returns None if nothing is left, and rounds to 2 decimals.",
    )


_CODE_TEMPLATES: tuple[Callable[[random.Random], _CodeTask], ...] = (
    _c_count_vowels,
    _c_reverse_words,
    _c_palindrome,
    _c_chunk,
    _c_top_k,
    _c_word_counts,
    _c_fizzbuzz,
    _c_flatten,
    _c_running_total,
    _c_dedupe,
    _c_long_words,
    _c_fibonacci,
    _c_lcm,
    _c_snake_to_camel,
    _c_digit_sum,
    _c_primes,
    _c_rotate,
    _c_clamp,
    _c_second_largest,
    _c_merge_sorted,
    _c_caesar,
    _c_mean,
)


def _fenced(code: str) -> str:
    return f"```python\n{code}```"


def _example(rng: random.Random, task: _CodeTask) -> str:
    return rng.choice(W.EXAMPLE_LINES).format(call=task.call, exp=repr(task.expected))


def _code_record(rng: random.Random, task: _CodeTask, domain: str, asks: tuple[str, ...]) -> Record:
    instruction = rng.choice(asks).format(
        sig=task.signature, name=task.name, goal=task.goal, desc=_third_person(task.goal)
    )
    args = ", ".join(repr(a) for a in task.args)
    input_ = rng.choice(
        (
            "",
            f"Example call: {task.call}",
            f"It should work for inputs like {args}.",
            f"Test it with the arguments {args}.",
        )
    )
    output = (
        f"{rng.choice(W.CODE_INTROS)}\n\n{_fenced(task.code)}\n\n{task.how} {_example(rng, task)}"
    )
    return _record(instruction, input_, output, domain)


def _code_item(rng: random.Random) -> Record:
    return _code_record(rng, rng.choice(_CODE_TEMPLATES)(rng), "code", W.CODE_ASKS)


# =========================================================================== finance_code


def _fc_compound(rng: random.Random) -> _CodeTask:
    name = rng.choice(["compound_interest", "future_balance", "grow_savings"])
    code = (
        f"def {name}(principal: float, rate: float, years: int, periods: int = 12) -> float:\n"
        '    """Balance after compounding `rate` (0.05 = 5%) `periods` times a year."""\n'
        "    growth = (1 + rate / periods) ** (periods * years)\n"
        "    return round(principal * growth, 2)\n"
    )
    p, r, t = rng.randrange(1000, 50001, 500), rng.choice(W.RATES) / 100, rng.randint(1, 30)
    periods = rng.choice([1, 4, 12])
    args: tuple[Any, ...] = (p, r, t) if periods == 12 else (p, r, t, periods)
    expected = round(p * (1 + r / periods) ** (periods * t), 2)
    return _CodeTask(
        "compute the future value of a deposit with compound interest",
        code,
        name,
        args,
        expected,
        "It applies the growth factor (1 + rate / periods) once per period and rounds to cents.",
    )


def _fc_payment(rng: random.Random) -> _CodeTask:
    name = rng.choice(["monthly_payment", "loan_payment", "amortized_payment"])
    code = (
        f"def {name}(principal: float, annual_rate: float, years: int) -> float:\n"
        "    r = annual_rate / 12\n"
        "    n = years * 12\n"
        "    if r == 0:\n"
        "        return round(principal / n, 2)\n"
        "    return round(principal * r * (1 + r) ** n / ((1 + r) ** n - 1), 2)\n"
    )
    p, rate, years = (
        rng.randrange(5000, 400001, 1000),
        rng.choice(W.RATES) / 100,
        rng.randint(2, 30),
    )
    r, n = rate / 12, years * 12
    expected = round(p * r * (1 + r) ** n / ((1 + r) ** n - 1), 2)
    return _CodeTask(
        "calculate the fixed monthly payment of an amortizing loan",
        code,
        name,
        (p, rate, years),
        expected,
        "It uses the annuity formula with the monthly rate and handles a zero rate separately.",
    )


def _fc_simple(rng: random.Random) -> _CodeTask:
    name = rng.choice(["simple_interest", "flat_interest", "interest_earned"])
    code = (
        f"def {name}(principal: float, rate: float, years: float) -> float:\n"
        "    return round(principal * rate * years, 2)\n"
    )
    p, r, t = rng.randrange(500, 30001, 50), rng.choice(W.RATES) / 100, rng.randint(1, 12)
    return _CodeTask(
        "compute simple interest from principal, annual rate and years",
        code,
        name,
        (p, r, t),
        round(p * r * t, 2),
        "It multiplies principal, rate and time, the definition of simple interest.",
    )


def _fc_roi(rng: random.Random) -> _CodeTask:
    name = rng.choice(["roi_percent", "return_on_investment", "roi"])
    code = (
        f"def {name}(cost: float, final_value: float) -> float:\n"
        "    if cost <= 0:\n"
        '        raise ValueError("cost must be positive")\n'
        "    return round((final_value - cost) / cost * 100, 2)\n"
    )
    cost = rng.randrange(100, 20001, 10)
    value = round(cost * rng.uniform(0.6, 2.0))
    return _CodeTask(
        "return the return on investment as a percentage",
        code,
        name,
        (cost, value),
        round((value - cost) / cost * 100, 2),
        "It divides the profit by the cost, scales to percent and rejects a non-positive cost.",
    )


def _fc_schedule(rng: random.Random) -> _CodeTask:
    name = rng.choice(["amortization_schedule", "first_payments", "loan_schedule"])
    code = (
        f"def {name}(principal: float, annual_rate: float, payment: float, months: int) -> list:\n"
        "    rows, balance, r = [], principal, annual_rate / 12\n"
        "    for month in range(1, months + 1):\n"
        "        interest = round(balance * r, 2)\n"
        "        balance = round(balance + interest - payment, 2)\n"
        "        rows.append((month, interest, balance))\n"
        "    return rows\n"
    )
    p, rate = rng.randrange(2000, 30001, 500), rng.choice(W.RATES) / 100
    payment, months = round(p * rate / 12 + rng.randint(50, 400), 2), rng.randint(2, 3)
    rows, balance, r = [], p, rate / 12
    for month in range(1, months + 1):
        interest = round(balance * r, 2)
        balance = round(balance + interest - payment, 2)
        rows.append((month, interest, balance))
    return _CodeTask(
        "list the first months of a loan's amortization schedule as (month, interest, balance)",
        code,
        name,
        (p, rate, payment, months),
        rows,
        "It adds each month's interest to the balance, subtracts the payment and records the row.",
    )


def _fc_annuity(rng: random.Random) -> _CodeTask:
    name = rng.choice(["savings_future_value", "future_value_of_deposits", "retirement_pot"])
    code = (
        f"def {name}(deposit: float, annual_rate: float, years: int) -> float:\n"
        "    r, n = annual_rate / 12, years * 12\n"
        "    if r == 0:\n"
        "        return round(deposit * n, 2)\n"
        "    return round(deposit * ((1 + r) ** n - 1) / r, 2)\n"
    )
    dep, rate, years = rng.randrange(50, 2001, 25), rng.choice(W.RATES) / 100, rng.randint(1, 40)
    r, n = rate / 12, years * 12
    return _CodeTask(
        "compute the future value of equal monthly deposits with monthly compounding",
        code,
        name,
        (dep, rate, years),
        round(dep * ((1 + r) ** n - 1) / r, 2),
        "It sums the geometric series of deposits in closed form, with a zero-rate shortcut.",
    )


def _fc_double(rng: random.Random) -> _CodeTask:
    name = rng.choice(["years_to_double", "doubling_time", "years_until_double"])
    code = (
        f"def {name}(rate: float) -> int:\n"
        "    years, balance = 0, 1.0\n"
        "    while balance < 2:\n"
        "        balance *= 1 + rate\n"
        "        years += 1\n"
        "    return years\n"
    )
    rate = rng.choice([0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1, 0.12])
    years, balance = 0, 1.0
    while balance < 2:
        balance *= 1 + rate
        years += 1
    return _CodeTask(
        "count the whole years needed for money to double at a given annual rate",
        code,
        name,
        (rate,),
        years,
        "It compounds a balance of 1 year by year until it reaches 2.",
    )


def _fc_npv(rng: random.Random) -> _CodeTask:
    name = rng.choice(["npv", "net_present_value", "discounted_value"])
    code = (
        f"def {name}(rate: float, cashflows: list[float]) -> float:\n"
        "    return round(sum(cf / (1 + rate) ** t for t, cf in enumerate(cashflows)), 2)\n"
    )
    rate = rng.choice([0.04, 0.05, 0.06, 0.08, 0.1])
    flows = [-rng.randrange(1000, 10001, 100)] + [
        rng.randrange(200, 4001, 50) for _ in range(rng.randint(2, 4))
    ]
    expected = round(sum(cf / (1 + rate) ** t for t, cf in enumerate(flows)), 2)
    return _CodeTask(
        "compute the net present value of yearly cash flows, the first at time zero",
        code,
        name,
        (rate, flows),
        expected,
        "It discounts each cash flow by (1 + rate) to the power of its year.",
    )


def _fc_break_even(rng: random.Random) -> _CodeTask:
    name = rng.choice(["break_even_units", "units_to_break_even"])
    code = (
        "import math\n\n\n"
        f"def {name}(fixed_costs: float, price: float, unit_cost: float) -> int:\n"
        "    margin = price - unit_cost\n"
        "    if margin <= 0:\n"
        '        raise ValueError("price must exceed the unit cost")\n'
        "    return math.ceil(fixed_costs / margin)\n"
    )
    fixed, unit = rng.randrange(500, 20001, 100), rng.randint(1, 30)
    price = unit + rng.randint(1, 30)
    return _CodeTask(
        "compute how many units a business must sell to break even",
        code,
        name,
        (fixed, price, unit),
        math.ceil(fixed / (price - unit)),
        "It divides fixed costs by the margin per unit and rounds up to whole units.",
    )


def _fc_budget(rng: random.Random) -> _CodeTask:
    name = rng.choice(["split_budget", "budget_50_30_20", "allocate_income"])
    code = (
        f"def {name}(income: float) -> dict[str, float]:\n"
        '    shares = {"needs": 0.5, "wants": 0.3, "savings": 0.2}\n'
        "    return {k: round(income * v, 2) for k, v in shares.items()}\n"
    )
    income = rng.randrange(1500, 12001, 50)
    expected = {
        k: round(income * v, 2) for k, v in (("needs", 0.5), ("wants", 0.3), ("savings", 0.2))
    }
    return _CodeTask(
        "split a monthly income using the 50/30/20 budgeting rule",
        code,
        name,
        (income,),
        expected,
        "It applies each share to the income and rounds every amount to cents.",
    )


_FIN_CODE_TEMPLATES: tuple[Callable[[random.Random], _CodeTask], ...] = (
    _fc_compound,
    _fc_payment,
    _fc_simple,
    _fc_roi,
    _fc_schedule,
    _fc_annuity,
    _fc_double,
    _fc_npv,
    _fc_break_even,
    _fc_budget,
)


def _finance_code_item(rng: random.Random) -> Record:
    return _code_record(rng, rng.choice(_FIN_CODE_TEMPLATES)(rng), "finance_code", W.FIN_CODE_ASKS)


# =========================================================================== stories


def _story_context(rng: random.Random) -> dict[str, str]:
    n, n2 = rng.sample(W.NAMES, 2)
    role, role2 = rng.sample(W.ROLES, 2)
    obj, place = rng.choice(W.OBJECTS), rng.choice(W.PLACES)
    a, a2 = rng.sample(W.ANIMALS, 2)
    t = rng.choice(W.TIMES)
    virtue, flaw, event, moral = rng.choice(W.FABLES)
    season = rng.choice(W.SEASONS)
    ctx = {
        "n": n,
        "n2": n2,
        "r": role,
        "r2": _bare(role2),
        "p": place,
        "o": obj,
        "ot": _the(obj),
        "ob": _bare(obj),
        "a": a,
        "a2": a2,
        "t": t,
        "tl": _lc(t),
        "f": rng.choice(W.FEELINGS),
        "hidden": rng.choice(W.HIDDEN),
        "magic": rng.choice(W.MAGIC),
        "clue": rng.choice(W.CLUES),
        "planet": rng.choice(W.PLANETS),
        "ship": rng.choice(W.SHIPS),
        "k": str(rng.randint(3, 400)),
        "h": str(rng.randint(6, 72)),
        "season": season,
        "season_cap": _cap(season),
        "virtue": virtue,
        "flaw": flaw,
        "moral": moral,
        "habitat": rng.choice(W.HABITATS),
        "first": rng.choice(W.FIRST_LINES),
    }
    for key in ("a", "a2"):
        article = "an" if ctx[key][0] in "aeiou" else "a"
        ctx["an_" + key], ctx["Aan_" + key] = f"{article} {ctx[key]}", f"{_cap(article)} {ctx[key]}"
    ctx["first"] = ctx["first"].format(**ctx)
    ctx["event"] = event.format(**ctx)
    return ctx


def _story_item(rng: random.Random) -> Record:
    groups, slots = rng.choice(W.STORY_FAMILIES)
    asks, openers = rng.choice(groups)
    ctx = _story_context(rng)
    instruction = rng.choice(asks).format(**ctx) + rng.choice(W.STORY_SUFFIXES)
    sentences = [_cap(rng.choice(slot).format(**ctx)) for slot in (openers, *slots)]
    return _record(instruction, "", " ".join(sentences), "stories")


# =========================================================================== support


# (ticket alternatives, reply-body alternatives); fields come from _support_context.


def _support_context(rng: random.Random) -> dict[str, str]:
    c = rng.choice(W.NAMES)
    return {
        "c": c,
        "agent": rng.choice(W.AGENTS),
        "prod": rng.choice(W.PRODUCTS),
        "oid": f"#{rng.randint(100000, 999999)}",
        "d": str(rng.randint(5, 21)),
        "d2": str(rng.randint(2, 6)),
        "day": rng.choice(W.WEEKDAYS),
        "day2": rng.choice(W.WEEKDAYS),
        "fee": _money(rng.choice([4.99, 5.95, 6.5, 7.99, 9.99])),
        "amount": _money(rng.randint(1500, 40000) / 100),
        "ref": str(rng.randint(10000, 99999)),
        "damage": rng.choice(
            ["cracked casing", "broken handle", "torn seam", "dented side", "missing part"]
        ),
        "email": f"{c.lower()}{rng.randint(1, 99)}@example.com",
        "plan": rng.choice(["Premium", "Family", "Pro", "Basic", "Student"]),
        "garment": rng.choice(["rain jacket", "pair of jeans", "wool sweater", "dress", "hoodie"]),
        "size": rng.choice(["S", "M", "L"]),
        "size2": rng.choice(["XS", "XL", "XXL"]),
        "screen": rng.choice(["Settings", "Checkout", "Order history", "Profile", "Search"]),
        "device": rng.choice(["Pixel 7", "iPhone 13", "Galaxy S22", "iPad Air", "OnePlus 11"]),
        "ver": f"{rng.randint(2, 6)}.{rng.randint(0, 12)}.{rng.randint(0, 9)}",
        "addr": f"{rng.randint(1, 250)} {rng.choice(W.WORDS).capitalize()} "
        f"{rng.choice(['Street', 'Road', 'Lane', 'Avenue'])}",
        "code": f"{rng.choice(['SAVE', 'SPRING', 'WELCOME', 'FLASH'])}{rng.randint(10, 40)}",
        "pct": str(rng.choice([10, 15, 20])),
        "min_spend": _money(rng.choice([50, 75, 100, 150, 200])),
    }


def _support_item(rng: random.Random) -> Record:
    tickets, replies = rng.choice(W.SUPPORT_FAMILIES)
    ctx = _support_context(rng)
    output = "\n\n".join(
        (
            rng.choice(W.GREETINGS).format(**ctx),
            rng.choice(replies).format(**ctx),
            rng.choice(W.SIGNOFFS).format(**ctx),
        )
    )
    return _record(rng.choice(W.SUPPORT_ASKS), rng.choice(tickets).format(**ctx), output, "support")


# =========================================================================== math_story


def _math_story_item(
    rng: random.Random, template: Callable[[random.Random, str], _Problem] | None = None
) -> tuple[Record, int]:
    """One ``math_story`` record and its expected final answer (used by the tests)."""
    template = template or rng.choice(_MATH_TEMPLATES)
    ctx = {
        "n": rng.choice(W.NAMES),
        "r": rng.choice(W.ROLES),
        "p": rng.choice(W.PLACES),
        "t": rng.choice(W.TIMES),
    }
    prob = template(rng, ctx["n"])
    mids = ["Next, ", "Then "]
    connectors = ["First, "] + [mids[i % 2] for i in range(len(prob.steps) - 2)] + ["Finally, "]
    woven = " ".join(c + _lc(s) for c, s in zip(connectors, prob.steps))
    parts = [
        rng.choice(W.STORY_OPENERS).format(**ctx),
        prob.setup,
        rng.choice(W.STORY_THOUGHTS).format(q=prob.question, **ctx),
        woven,
        rng.choice(W.STORY_CLOSINGS).format(a=prob.answer, u=prob.unit, **ctx),
    ]
    output = " ".join(parts) + f"\nThe answer is {prob.answer}."
    if rng.random() < 0.5:
        instruction, input_ = rng.choice(W.MATH_STORY_ASKS), f"{prob.setup} {prob.question}"
    else:
        instruction = (
            f"Write a short story about {ctx['n']}, {ctx['r']}, that contains a math problem "
            "and its worked solution. End with the final answer."
        )
        input_ = ""
    return _record(instruction, input_, output, "math_story"), prob.answer


# =========================================================================== code_story


def _cs_fairy_tale(rng: random.Random, task: _CodeTask) -> tuple[str, str, str]:
    instr = rng.choice(
        [
            "Explain what this Python function does by telling it as a short story.",
            "Turn the following code into a little story that explains how it works.",
            "Narrate, as a fairy tale, what happens when this function runs.",
        ]
    )
    out = (
        f"{rng.choice(['Once upon a time', 'Long ago', 'In a quiet corner of a big program'])}, "
        f"there lived a function called `{task.name}`. Its one job was to {task.goal}. "
        f"Its secret was simple: {_lc(task.how)} One day a caller knocked with a request, and "
        f"`{task.call}` returned `{task.expected!r}` before the caller had finished asking. "
        f"{rng.choice(['And it has done its job faithfully ever since.', 'The end.'])}"
    )
    return instr, _fenced(task.code), out


def _cs_plain(rng: random.Random, task: _CodeTask) -> tuple[str, str, str]:
    instr = rng.choice(
        [
            "Explain in plain English what the following code does.",
            "What does this function do? Answer without jargon.",
            "Describe this Python code for someone who has never programmed.",
        ]
    )
    use = rng.choice(
        [
            f"It is handy whenever you need to {task.goal} without writing the loop by hand.",
            "You could drop it into any script that cleans up or summarises data.",
            "Because it has no side effects, it is easy to test and reuse.",
        ]
    )
    out = (
        f"This function, `{task.name}`, is a small helper: it will {task.goal}. "
        f"{task.how} For instance, `{task.call}` returns `{task.expected!r}`. {use}"
    )
    return instr, _fenced(task.code), out


def _cs_bedtime(rng: random.Random, task: _CodeTask) -> tuple[str, str, str]:
    instr = rng.choice(
        [
            "Describe what this code does as a bedtime story for a child.",
            "Explain this function to a seven-year-old, as a gentle story.",
        ]
    )
    helper = rng.choice(["a tidy little robot", "a patient owl", "a busy beaver", "a careful elf"])
    out = (
        f"Close your eyes, little one. In the land of Python lived {helper} named `{task.name}`. "
        f"Whenever someone asked, it would {task.goal}. {task.how} Tonight, a friend asked for "
        f"help, and `{task.call}` returned `{task.expected!r}`. {_cap(_the(helper))} yawned, "
        "tidied its tools, and went to sleep. Goodnight."
    )
    return instr, _fenced(task.code), out


def _cs_character(rng: random.Random, task: _CodeTask) -> tuple[str, str, str]:
    n, role, place = rng.choice(W.NAMES), rng.choice(W.ROLES), rng.choice(W.PLACES)
    instr = rng.choice(
        [
            f"Write a short story about {n}, {role}, who writes a small Python program to "
            f"{task.goal}. Include the code.",
            f"Tell a story in which {n} automates a chore in Python. Show the function {n} writes.",
        ]
    )
    out = (
        f"{n} was {role} in {place}, and every week one chore ate an evening: having to "
        f"{task.goal} by hand. "
        f"{rng.choice(['It was slow and full of mistakes.', 'It took whole evenings.'])} "
        f"One night {n} opened a laptop and wrote this:\n\n{_fenced(task.code)}\n\n"
        f"{task.how} On the first try, `{task.call}` returned `{task.expected!r}`, and {n} "
        f"{rng.choice(['laughed out loud.', 'went to bed early.', 'called a friend to show off.'])}"
    )
    return instr, "", out


def _cs_diary(rng: random.Random, task: _CodeTask) -> tuple[str, str, str]:
    instr = rng.choice(
        [
            f"Write a diary entry by a junior developer who just wrote `{task.name}`. Show the "
            "code.",
            f"As a new programmer, write a journal entry about writing a function to {task.goal}.",
        ]
    )
    out = (
        f"Dear diary, today I wrote a function that can {task.goal}. "
        f"{rng.choice(['My mentor had one comment.', 'It took three tries.', 'I am oddly proud.'])}"
        f"\n\n{_fenced(task.code)}\n\n{task.how} When I ran it, `{task.call}` returned "
        f"`{task.expected!r}`. Tomorrow: tests!"
    )
    return instr, "", out


_CODE_STORY_TEMPLATES: tuple[Callable[[random.Random, _CodeTask], tuple[str, str, str]], ...] = (
    _cs_fairy_tale,
    _cs_plain,
    _cs_bedtime,
    _cs_character,
    _cs_diary,
)


def _code_story_item(rng: random.Random) -> Record:
    task = rng.choice(_CODE_TEMPLATES)(rng)
    return _record(*rng.choice(_CODE_STORY_TEMPLATES)(rng, task), "code_story")


# =========================================================================== assembly

_GENERATORS: dict[str, Callable[[random.Random], Record]] = {
    "math": lambda rng: _math_item(rng)[0],
    "code": _code_item,
    "finance": _finance_item,
    "stories": _story_item,
    "support": _support_item,
    "finance_code": _finance_code_item,
    "math_story": lambda rng: _math_story_item(rng)[0],
    "code_story": _code_story_item,
}


def _quotas(n_samples: int) -> dict[str, int]:
    """Per-domain counts summing exactly to ``n_samples`` (largest-remainder rounding)."""
    raw = {d: _WEIGHTS[d] * n_samples for d in DOMAINS}
    counts = {d: int(v) for d, v in raw.items()}
    by_remainder = sorted(DOMAINS, key=lambda d: (-(raw[d] - counts[d]), DOMAINS.index(d)))
    for d in by_remainder[: n_samples - sum(counts.values())]:
        counts[d] += 1
    return counts


def build_demo_corpus(n_samples: int = 2400, seed: int = 0) -> list[dict]:
    """Generate the built-in instruction corpus: ``n_samples`` records determined by ``seed``.

    Each record is ``{"id", "instruction", "input", "output", "domain"}``; ``domain`` is one of
    ``DOMAINS`` (evaluation metadata only). Domains follow fixed shares (four base domains at 19 %
    each, ``support`` 7 %, cross-domain items 17 %), each drawn from its own seeded stream; a draw
    whose output repeats an earlier one is retried a few times. The list is shuffled
    deterministically, then ids ``demo-00000``, ``demo-00001``, ... are assigned in order.
    """
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0, got {n_samples}")
    records: list[Record] = []
    seen: set[str] = set()
    for domain, count in _quotas(n_samples).items():
        rng = random.Random(f"gs_ray-demo:{seed}:{domain}")
        generate = _GENERATORS[domain]
        for _ in range(count):
            rec = generate(rng)
            for _ in range(_MAX_RETRIES):
                if rec["output"] not in seen:
                    break
                rec = generate(rng)
            seen.add(rec["output"])
            records.append(rec)
    random.Random(f"gs_ray-demo:{seed}:shuffle").shuffle(records)
    return [{"id": f"demo-{i:05d}", **rec} for i, rec in enumerate(records)]


PRETRAIN_SEED_OFFSET = 1_000_003  # the pretraining part's streams: no instruction run seed is near
# The pretraining texts leave out every record of the demo corpus of this size (and of the run's
# own, if larger): a demo corpus of n records is, domain by domain, the first draws of the same
# streams, so one exclusion serves every demo_size up to it and the pretrained base model (cached
# by its texts) is the same for all of them.
PRETRAIN_EXCLUDE_SIZE = 20_000


def pretraining_texts(n_records: int, seed: int, instruction_corpus: list[dict]) -> list[str]:
    """Plain texts to pretrain the embedded default's base model on: ``n_records`` demo records
    from other random streams (seed + PRETRAIN_SEED_OFFSET), less every record whose output or
    whose prompt (instruction and input) occurs in ``instruction_corpus`` or in the demo corpus
    of ``PRETRAIN_EXCLUDE_SIZE`` records of this seed, so that no instruction sample is ever seen
    in pretraining, and the texts do not depend on the instruction corpus's size. A text is the
    instruction, the input and the output as paragraphs, with no template: the base model learns
    the language of the domains, not the instruction format."""
    excluded = [*build_demo_corpus(PRETRAIN_EXCLUDE_SIZE, seed), *instruction_corpus]
    outputs = {r["output"] for r in excluded}
    prompts = {(r["instruction"], r["input"]) for r in excluded}
    texts = []
    for r in build_demo_corpus(n_records, seed + PRETRAIN_SEED_OFFSET):
        if r["output"] in outputs or (r["instruction"], r["input"]) in prompts:
            continue
        texts.append("\n\n".join(x for x in (r["instruction"], r["input"], r["output"]) if x))
    return texts
