"""Fluent but wrong answers: a GSM8K solution with one arithmetic slip, carried through every later step.

The bench's second kind of label noise (``data.train.label_noise_type: numbers``) and the contrast answers of the
``numbers`` evaluation (:mod:`trl_qtuning.bench.contrast`). A swapped answer (``label_noise_type: swap``) belongs to
another question; this one belongs to the right question and reads like a correct solution, but its first calculator
step gives a wrong result and every later step computes correctly from it, so the final answer is wrong too.

GSM8K solutions carry calculator annotations ``<<48/2=24>>24``. The first one's result is moved by a small seeded
amount; each later annotation's expression is re-evaluated with the changed numbers substituted, and every later
mention of a changed number in the prose (the printed results, ``#### N``) follows. A solution without annotations,
or whose chain cannot be re-evaluated, gets its final number moved and every mention of it replaced instead.
"""

from __future__ import annotations

import ast
import hashlib
import math
import operator
import random
import re
from decimal import Decimal
from typing import Any

__all__ = ["completion_text", "perturb_solution", "row_rng", "with_text"]

_ANNOTATION = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
_NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")
_OPERATORS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos,
}  # fmt: skip


def completion_text(completion: Any) -> str:
    """The answer text of a completion: a string, or the last message of a conversational one."""
    return completion[-1]["content"] if isinstance(completion, list) else completion


def with_text(completion: Any, text: str) -> Any:
    """``completion`` with its answer text replaced (the same shape: string, or messages)."""
    if isinstance(completion, list):
        return [*completion[:-1], {**completion[-1], "content": text}]
    return text


def row_rng(seed: int, key: str) -> random.Random:
    """A generator for one row, the same on every machine: seeded by ``sha256(seed:key)``."""
    return random.Random(int.from_bytes(hashlib.sha256(f"{seed}:numbers:{key}".encode()).digest()[:8], "big"))


def _key(text: str) -> str:
    """A number as compared: no thousands commas, no trailing decimal zeros (``"1,200.50"`` -> ``"1200.5"``)."""
    plain = text.replace(",", "")
    return plain.rstrip("0").rstrip(".") if "." in plain else plain


def _format(value: float) -> str | None:
    """Integers as integers, others to at most 2 decimals; None for what a solution cannot print (inf, nan)."""
    if not math.isfinite(value):
        return None
    if abs(value - round(value)) < 1e-9:
        return str(int(round(value)))
    return _key(f"{value:.2f}")


def _evaluate(expression: str) -> float | None:
    """The value of a calculator expression (+ - * / ** and parentheses over numbers), None if it is not one."""
    try:
        node = ast.parse(expression.replace(",", "").replace("x", "*").replace("^", "**"), mode="eval").body
    except SyntaxError:
        return None

    def value(n: ast.AST) -> float:
        if isinstance(n, ast.Constant) and isinstance(n.value, (int, float)):
            return float(n.value)
        if isinstance(n, ast.BinOp) and type(n.op) in _OPERATORS:
            if isinstance(n.op, ast.Pow) and abs(value(n.right)) > 10:
                raise ValueError("exponent too large")
            return _OPERATORS[type(n.op)](value(n.left), value(n.right))
        if isinstance(n, ast.UnaryOp) and type(n.op) in _OPERATORS:
            return _OPERATORS[type(n.op)](value(n.operand))
        raise ValueError("not arithmetic")

    try:
        return value(node)
    except (ValueError, ZeroDivisionError, OverflowError):
        return None


def _moved(number: str, rng: random.Random) -> str:
    """A different, plausible number: an integer moves by 1-3 units of its second digit (24 -> 21..27, 1500 ->
    1200..1800, never below 0); a decimal scales by 0.7-1.3 (never to itself)."""
    value = Decimal(_key(number))
    if value == value.to_integral_value():
        unit = 10 ** max(0, len(str(abs(int(value)))) - 2)
        steps = [s for s in (-3, -2, -1, 1, 2, 3) if int(value) + s * unit >= 0]
        return str(int(value) + rng.choice(steps) * unit)
    factor = rng.choice((0.7, 0.8, 0.9, 1.1, 1.2, 1.3))
    moved = _format(float(value) * factor)
    return moved if moved is not None and moved != _key(number) else _key(str(value + 1))


def _substitute(text: str, mapping: dict[str, str]) -> str:
    return _NUMBER.sub(lambda m: mapping.get(_key(m.group()), m.group()), text)


def _carry_slip(solution: str, rng: random.Random) -> str | None:
    """The first annotation's result moved and the chain re-evaluated; None where the chain cannot be followed."""
    annotations = list(_ANNOTATION.finditer(solution))
    if not annotations:
        return None
    first = annotations[0]
    old = _key(first.group(2))
    if not _NUMBER.fullmatch(first.group(2).strip()):
        return None
    mapping = {old: _moved(old, rng)}
    parts = [solution[: first.start()], f"<<{first.group(1)}={mapping[old]}>>"]
    position = first.end()
    for match in annotations[1:]:
        parts.append(_substitute(solution[position : match.start()], mapping))
        expression = _substitute(match.group(1), mapping)
        value = _evaluate(expression)
        result = _format(value) if value is not None else None
        if result is None:
            return None
        if result != _key(match.group(2)):
            mapping[_key(match.group(2))] = result
        else:  # this step gives its old value again: later mentions of that value are this step's, unchanged
            mapping.pop(result, None)
        parts.append(f"<<{expression}={result}>>")
        position = match.end()
    parts.append(_substitute(solution[position:], mapping))
    return "".join(parts)


def _move_final(solution: str, rng: random.Random) -> str | None:
    """The final number (after ``####``, else the last one) moved, with every mention of it."""
    _, sep, tail = solution.rpartition("####")
    numbers = _NUMBER.findall(tail if sep else solution)
    if not numbers:
        return None
    final = _key(numbers[0] if sep else numbers[-1])
    return _substitute(solution, {final: _moved(final, rng)})


def perturb_solution(solution: str, rng: random.Random) -> str | None:
    """``solution`` with a consistent arithmetic slip (see the module docstring); None if it holds no number.

    The result always differs from ``solution`` in its final answer when it ends in ``#### N``.
    """
    final = _final(solution)
    for attempt in (_carry_slip, _move_final):
        out = attempt(solution, rng)
        if out is not None and out != solution and (final is None or _final(out) != final):
            return out
    return None


def _final(solution: str) -> str | None:
    _, sep, tail = solution.rpartition("####")
    numbers = _NUMBER.findall(tail) if sep else []
    return str(Decimal(_key(numbers[0])).normalize()) if numbers else None  # (a _NUMBER match is always a Decimal)
