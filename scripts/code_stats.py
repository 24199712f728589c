"""Size of the pack's source: the longest files and functions of linfusion/ and nodes/ (an AST scan).

    python scripts/code_stats.py [--top N] [folders...]

Prints files by line count, then functions (methods and nested functions included) by their
line span, each with its cyclomatic complexity (1 + branches: if/for/while/except/with,
boolean operators, comprehension filters, conditional expressions). Reads the files as text;
imports nothing of the pack.
"""

from __future__ import annotations

import argparse
import ast
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BRANCHES = (ast.If, ast.For, ast.AsyncFor, ast.While, ast.ExceptHandler, ast.With, ast.AsyncWith, ast.IfExp,
            ast.Assert, ast.comprehension)


def complexity(fn: ast.AST) -> int:
    """1 + branch points of `fn`, not counting the functions nested in it."""
    n = 1
    stack = list(ast.iter_child_nodes(fn))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, BRANCHES):
            n += 1 + (len(node.ifs) if isinstance(node, ast.comprehension) else 0)
        elif isinstance(node, ast.BoolOp):
            n += len(node.values) - 1
        stack.extend(ast.iter_child_nodes(node))
    return n


def functions(path: Path) -> list[tuple[int, int, str]]:
    """(lines, complexity, qualified name) of every function in `path`."""
    tree = ast.parse(path.read_text(), str(path))
    found = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                found.append((child.end_lineno - child.lineno + 1, complexity(child), name))
                walk(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                walk(child, f"{prefix}{child.name}.")
            else:
                walk(child, prefix)

    walk(tree, "")
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="*", default=["linfusion", "nodes"])
    ap.add_argument("--top", type=int, default=15)
    a = ap.parse_args()
    files = sorted(p for f in a.folders for p in (ROOT / f).rglob("*.py"))
    sizes = sorted(((len(p.read_text().splitlines()), p.relative_to(ROOT)) for p in files), reverse=True)
    fns = sorted(((n, c, f"{p.relative_to(ROOT)}:{name}") for p in files for n, c, name in functions(p)),
                 reverse=True)
    print(f"{len(files)} files, {sum(n for n, _ in sizes)} lines; {len(fns)} functions, median "
          f"{statistics.median(n for n, _, _ in fns):.1f} lines; over 60 lines: "
          f"{sum(n > 60 for n, _, _ in fns)}; files over 550 lines: {sum(n > 550 for n, _ in sizes)}")
    print("\nlongest files")
    for n, p in sizes[:a.top]:
        print(f"  {n:5d}  {p}")
    print("\nlongest functions (lines, complexity)")
    for n, c, name in fns[:a.top]:
        print(f"  {n:5d} {c:4d}  {name}")


if __name__ == "__main__":
    main()
