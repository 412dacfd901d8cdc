"""The house stays one a reader can hold: no function over 60 lines, no module over 400, in
the product code (pipelines/, tasks/, models/) and the benchmarks; tests aside."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("pipelines", "tasks", "models", "benchmarks")
MAX_FUNCTION, MAX_MODULE = 60, 400


def _sources() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (ROOT / folder).glob("*.py"))


def test_no_module_is_longer_than_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in _sources() if (n := len(p.read_text().splitlines())) > MAX_MODULE}
    assert not long, f"modules over {MAX_MODULE} lines: {long}"


def test_no_function_is_longer_than_60_lines():
    long = {}
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION:
                    long[f"{path.relative_to(ROOT)}:{node.name}"] = lines
    assert not long, f"functions over {MAX_FUNCTION} lines: {long}"


def test_no_config_object_is_read_with_a_default():
    """Config sections are typed: `getattr(cfg, "x", default)` would repeat (and drift from) the
    section's own default."""
    offenders = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "getattr" and len(node.args) == 3:
                target = ast.unparse(node.args[0])
                if target.endswith("cfg") or target.startswith("cfg."):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
    assert not offenders, offenders
