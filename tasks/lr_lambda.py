"""A safe parser for LambdaLR expressions such as ``0.95 ** epoch``.

The expression is parsed with `ast` and evaluated by walking a small whitelist of
nodes: numbers, the name ``epoch``, + - * / // % **, unary minus, and a few math
functions. Nothing is ever passed to `eval`, so user text cannot run code.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable

from tasks.errors import LambdaExpressionError

__all__ = ["LambdaExpressionError", "compile_lr_lambda"]

_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_FUNCS: dict[str, Callable[..., float]] = {
    "min": min,
    "max": max,
    "exp": math.exp,
    "log": math.log,
    "sqrt": math.sqrt,
    "cos": math.cos,
    "sin": math.sin,
    "floor": math.floor,
    "ceil": math.ceil,
    "abs": abs,
}
_CONSTS = {"pi": math.pi, "e": math.e}
_MAX_LEN = 200


def _check(node: ast.AST, text: str) -> None:
    if isinstance(node, ast.Expression):
        _check(node.body, text)
    elif isinstance(node, ast.Constant):
        if not isinstance(node.value, (int, float)) or isinstance(node.value, bool):
            raise LambdaExpressionError(f"{text!r}: only numbers are allowed as constants, got {node.value!r}")
    elif isinstance(node, ast.Name):
        if node.id != "epoch" and node.id not in _CONSTS:
            raise LambdaExpressionError(f"{text!r}: unknown name {node.id!r}; the only variable is 'epoch'")
    elif isinstance(node, ast.BinOp):
        if type(node.op) not in _BINOPS:
            raise LambdaExpressionError(f"{text!r}: operator {type(node.op).__name__} is not allowed")
        _check(node.left, text)
        _check(node.right, text)
    elif isinstance(node, ast.UnaryOp):
        if type(node.op) not in _UNARY:
            raise LambdaExpressionError(f"{text!r}: operator {type(node.op).__name__} is not allowed")
        _check(node.operand, text)
    elif isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCS or node.keywords:
            raise LambdaExpressionError(f"{text!r}: only these functions may be called: {', '.join(sorted(_FUNCS))}")
        for arg in node.args:
            _check(arg, text)
    else:
        raise LambdaExpressionError(
            f"{text!r}: {type(node).__name__} is not allowed; use numbers, 'epoch', + - * / // % ** and "
            f"{', '.join(sorted(_FUNCS))}"
        )


def _eval(node: ast.AST, epoch: int) -> float:
    if isinstance(node, ast.Expression):
        return _eval(node.body, epoch)
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return epoch if node.id == "epoch" else _CONSTS[node.id]
    if isinstance(node, ast.BinOp):
        left, right = _eval(node.left, epoch), _eval(node.right, epoch)
        if isinstance(node.op, ast.Pow):
            if abs(right) > 1e4:
                raise LambdaExpressionError(f"exponent {right} is too large")
            # in floats: a result beyond float range is an OverflowError at once, not a huge integer
            # computed for minutes, as (9999**9999)**9999 would be
            return float(left) ** float(right)
        return _BINOPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_eval(node.operand, epoch))
    assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    return _FUNCS[node.func.id](*(_eval(a, epoch) for a in node.args))


def compile_lr_lambda(text: str, epochs: int | None = None) -> Callable[[int], float]:
    """Parse `text` once and return `f(epoch) -> float`; raise LambdaExpressionError when it is not allowed,
    or when it fails at an epoch the run reaches (every epoch 0..epochs when `epochs` is given)."""
    if not isinstance(text, str) or not text.strip():
        raise LambdaExpressionError("the expression is empty; example: '0.95 ** epoch'")
    if len(text) > _MAX_LEN:
        raise LambdaExpressionError(f"the expression is longer than {_MAX_LEN} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise LambdaExpressionError(f"{text!r} is not a valid expression: {exc.msg}") from None
    _check(tree, text)

    def lr_lambda(epoch: int) -> float:
        try:
            value = float(_eval(tree, epoch))
        except (ArithmeticError, ValueError, TypeError) as exc:
            raise LambdaExpressionError(f"{text!r} failed at epoch {epoch}: {exc}") from None
        if not math.isfinite(value) or value < 0:
            raise LambdaExpressionError(f"{text!r} gave {value} at epoch {epoch}; expected a finite value >= 0")
        return value

    for probe in range(epochs + 1) if epochs else (0, 1, 10):  # division by zero and the like, before training
        lr_lambda(probe)
    return lr_lambda
