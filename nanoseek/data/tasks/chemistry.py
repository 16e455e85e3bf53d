"""Balance a chemical equation: verified by counting atoms, with coefficients in lowest terms.

reasoning_gym has no such task. A curated list of reactions gives the species; the reference coefficients are
computed, not typed in: the exact (Fraction) null space of the element-by-species matrix, which is
one-dimensional for every reaction here (tested), scaled to the smallest positive integers. Since that
solution is unique, an answer scores 1.0 iff it names exactly the question's species on the same sides,
balances every element, and its positive integer coefficients share no common factor.
Difficulty buckets the reactions by the sum of their balanced coefficients.
"""
from __future__ import annotations

import functools
import math
import random
import re
from collections import Counter
from fractions import Fraction

from nanoseek.data.tasks.base import DIFFICULTIES, Task, TaskItem, base_seed, check_difficulty

# (reactants, products) as written in the question; coefficients are derived by `balance`.
REACTIONS = [
    ("H2 O2", "H2O"), ("N2 H2", "NH3"), ("Na Cl2", "NaCl"), ("Mg O2", "MgO"), ("H2 Cl2", "HCl"),
    ("CaCO3", "CaO CO2"), ("KClO3", "KCl O2"), ("H2O2", "H2O O2"), ("Fe O2", "Fe2O3"), ("Al O2", "Al2O3"),
    ("Zn HCl", "ZnCl2 H2"), ("CH4 O2", "CO2 H2O"), ("NaOH HCl", "NaCl H2O"), ("C3H8 O2", "CO2 H2O"),
    ("C2H6 O2", "CO2 H2O"), ("Al HCl", "AlCl3 H2"), ("Fe2O3 CO", "Fe CO2"), ("SO2 O2", "SO3"),
    ("P4 O2", "P4O10"), ("NH3 O2", "NO H2O"), ("C6H12O6 O2", "CO2 H2O"), ("Ca(OH)2 HCl", "CaCl2 H2O"),
    ("Al2(SO4)3 Ca(OH)2", "Al(OH)3 CaSO4"), ("Fe H2O", "Fe3O4 H2"), ("C4H10 O2", "CO2 H2O"),
    ("KMnO4 HCl", "KCl MnCl2 Cl2 H2O"), ("Cu HNO3", "Cu(NO3)2 NO H2O"), ("FeS2 O2", "Fe2O3 SO2"),
    ("C8H18 O2", "CO2 H2O"), ("Na2CO3 HCl", "NaCl H2O CO2"), ("Pb(NO3)2", "PbO NO2 O2"), ("NH4NO3", "N2O H2O"),
    ("Ca3(PO4)2 SiO2 C", "CaSiO3 P4 CO"), ("K4Fe(CN)6 KMnO4 H2SO4", "KHSO4 Fe2(SO4)3 MnSO4 HNO3 CO2 H2O"),
    ("Cu H2SO4", "CuSO4 SO2 H2O"), ("Li H2O", "LiOH H2"), ("C2H5OH O2", "CO2 H2O"), ("Al Fe2O3", "Al2O3 Fe"),
    ("NaHCO3", "Na2CO3 H2O CO2"), ("Ag HNO3", "AgNO3 NO H2O"), ("MnO2 HCl", "MnCl2 Cl2 H2O"),
    ("Zn HNO3", "Zn(NO3)2 NH4NO3 H2O"), ("KI KMnO4 H2SO4", "I2 MnSO4 K2SO4 H2O"), ("Fe(OH)3", "Fe2O3 H2O"),
    ("CS2 O2", "CO2 SO2"), ("PCl5 H2O", "H3PO4 HCl"), ("C12H22O11 O2", "CO2 H2O"), ("Fe2O3 C", "Fe CO2"),
    ("K2Cr2O7 HCl", "KCl CrCl3 Cl2 H2O"), ("As2S3 HNO3 H2O", "H3AsO4 H2SO4 NO"),
]

_TOKEN_RE = re.compile(r"([A-Z][a-z]?|\(|\)|\d+)")
_FORMULA_RE = re.compile(r"^(?:[A-Z][a-z]?\d*|\(|\)\d*)+$")
_TERM_RE = re.compile(r"^(\d*)\s*\*?\s*([A-Z(].*)$")
_STATE_RE = re.compile(r"\((?:s|l|g|aq)\)$")


def atoms(formula: str) -> Counter:
    """Element counts of a formula with nested parentheses: "Al2(SO4)3" -> {Al: 2, S: 3, O: 12}."""
    if not _FORMULA_RE.match(formula):
        raise ValueError(f"not a chemical formula: {formula!r}")
    stack = [Counter()]
    tokens = _TOKEN_RE.findall(formula)
    i = 0
    while i < len(tokens):
        tok, i = tokens[i], i + 1
        if tok == "(":
            stack.append(Counter())
            continue
        mult = 1
        if i < len(tokens) and tokens[i].isdigit():
            mult, i = int(tokens[i]), i + 1
        if tok == ")":
            if len(stack) == 1:
                raise ValueError(f"unbalanced parentheses in {formula!r}")
            for el, k in stack.pop().items():
                stack[-1][el] += k * mult
        elif tok.isdigit():
            raise ValueError(f"misplaced count in {formula!r}")
        else:
            stack[-1][tok] += mult
    if len(stack) != 1:
        raise ValueError(f"unbalanced parentheses in {formula!r}")
    return stack[0]


def balance(reactants: list[str], products: list[str]) -> list[int]:
    """Smallest positive integer coefficients (reactants then products); ValueError unless the solution is
    unique up to scale."""
    species = reactants + products
    counts = [atoms(s) for s in species]
    elements = sorted(set().union(*counts))
    # Rows: elements; columns: species (products negated). Solve M c = 0 by Gauss-Jordan over Fractions.
    rows = [[Fraction(c[el]) * (1 if j < len(reactants) else -1) for j, c in enumerate(counts)] for el in elements]
    pivots, r = [], 0
    for col in range(len(species)):
        piv = next((i for i in range(r, len(rows)) if rows[i][col] != 0), None)
        if piv is None:
            continue
        rows[r], rows[piv] = rows[piv], rows[r]
        rows[r] = [x / rows[r][col] for x in rows[r]]
        for i in range(len(rows)):
            if i != r and rows[i][col] != 0:
                rows[i] = [a - rows[i][col] * b for a, b in zip(rows[i], rows[r])]
        pivots.append(col)
        r += 1
    free = [c for c in range(len(species)) if c not in pivots]
    if len(free) != 1:
        raise ValueError(f"{reactants} -> {products}: {len(free)}-dimensional solution space, not unique")
    sol = [Fraction(0)] * len(species)
    sol[free[0]] = Fraction(1)
    for i, col in enumerate(pivots):
        sol[col] = -rows[i][free[0]]
    scale = math.lcm(*(x.denominator for x in sol))
    ints = [int(x * scale) for x in sol]
    if all(x < 0 for x in ints):
        ints = [-x for x in ints]
    if any(x <= 0 for x in ints):
        raise ValueError(f"{reactants} -> {products}: no all-positive balancing")
    g = math.gcd(*ints)
    return [x // g for x in ints]


def format_equation(reactants, products, coefs=None) -> str:
    coefs = coefs or [1] * (len(reactants) + len(products))
    terms = [f"{k} {s}" if k != 1 else s for k, s in zip(coefs, reactants + products)]
    return " + ".join(terms[:len(reactants)]) + " -> " + " + ".join(terms[len(reactants):])


def _parse_side(side: str) -> list[tuple[int, str]] | None:
    out = []
    for term in side.split("+"):
        m = _TERM_RE.match(term.strip())
        if not m:
            return None
        formula = _STATE_RE.sub("", m.group(2).replace(" ", ""))  # "H2O(l)" names the same species as "H2O"
        out.append((int(m.group(1)) if m.group(1) else 1, formula))
    return out


@functools.lru_cache(maxsize=1)
def _buckets() -> dict[int, list[int]]:
    """Reaction indices per difficulty: sorted by the sum of balanced coefficients, split into equal parts."""
    order = sorted(range(len(REACTIONS)), key=lambda i: (sum(balance(*_split(REACTIONS[i]))), i))
    size = len(order) / len(DIFFICULTIES)
    return {d: order[round((d - 1) * size):round(d * size)] for d in DIFFICULTIES}


def _split(reaction) -> tuple[list[str], list[str]]:
    return reaction[0].split(), reaction[1].split()


class ChemistryTask(Task):
    name = "chemistry"
    answer_kind = "equation"

    def generate(self, n, seed=0, difficulty=1):
        pool = _buckets()[check_difficulty(difficulty)]
        rng = random.Random(base_seed(self.name, seed, difficulty))
        items = []
        for _ in range(n):
            reactants, products = _split(REACTIONS[rng.choice(pool)])
            rng.shuffle(reactants)
            rng.shuffle(products)
            coefs = balance(reactants, products)
            items.append(TaskItem(
                question=(f"Balance the chemical equation {format_equation(reactants, products)}. Write the balanced "
                          f"equation with the smallest whole-number coefficients, e.g. 2 H2 + O2 -> 2 H2O."),
                answer=format_equation(reactants, products, coefs), task=self.name,
                meta={"reactants": reactants, "products": products, "coefficients": coefs,
                      "difficulty": difficulty}))
        return items

    def verify(self, answer, item):
        text = answer.strip().strip("$").replace("\\rightarrow", "->").replace("\\to", "->")
        for arrow in ("→", "⟶", "<=>", "=>", "="):
            text = text.replace(arrow, "->")
        if text.count("->") != 1:
            return 0.0
        left, right = (_parse_side(s) for s in text.split("->"))
        if left is None or right is None:
            return 0.0
        # Same species, each once, on the same sides as asked (order within a side is free).
        if sorted(s for _, s in left) != sorted(item.meta["reactants"]) or \
                sorted(s for _, s in right) != sorted(item.meta["products"]):
            return 0.0
        coefs = [k for k, _ in left + right]
        if min(coefs) <= 0 or math.gcd(*coefs) != 1:
            return 0.0
        lhs, rhs = Counter(), Counter()
        for k, s in left:
            lhs.update({el: k * n for el, n in atoms(s).items()})
        for k, s in right:
            rhs.update({el: k * n for el, n in atoms(s).items()})
        return float(lhs == rhs)
