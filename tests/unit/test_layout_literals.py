"""Run-root paths are spelled in one place: no module outside ``u2seg/io/layout.py`` writes one as a literal."""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

pytestmark = pytest.mark.unit

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "u2seg"
# A stage folder at the start of a relative path, or a file name only the run root uses.
RUN_ROOT_PATH = re.compile(
    r"^(manifest|stuff|extract|cluster|labels|train|predict|selftrain|eval|finetune)/"
    r"|(^|/)(round-\d|_SUCCESS|_STARTED|_LEASE|_PROGRESS\.json|things\.npy|stuff\.npy|fit\.json|sizes\.json"
    r"|metrics\.jsonl?|mapping\.json|report\.html|model\.pt|head\.pt)$")
# Modules allowed to spell them: the layout itself; export's pattern of which label sets may be exported.
ALLOWED = {"io/layout.py", "pipeline/export.py"}


def run_root_literals(source: str) -> list[tuple[int, str]]:
    """(line, text) of every string constant that looks like a run-root path (docstrings and prose skipped)."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str) and " " not in node.value
                and RUN_ROOT_PATH.search(node.value)):
            hits.append((node.lineno, node.value))
    return hits


def test_the_pattern_finds_the_spellings_it_must_catch() -> None:
    src = 'a = "cluster/things.npy"\nb = f"{x}/metrics.json"\nc = f"train/round-{r}"\nd = "a folder/report.html"\n'
    assert [t for _, t in run_root_literals(src)] == ["cluster/things.npy", "/metrics.json", "train/round-"]


def test_no_module_outside_the_layout_spells_a_run_root_path() -> None:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel not in ALLOWED and (hits := run_root_literals(path.read_text())):
            found[rel] = hits
    assert found == {}, f"use u2seg.io.layout for these run-root paths: {found}"
