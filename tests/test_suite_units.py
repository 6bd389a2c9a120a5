"""The suite's units of work on two xdist workers (tests/conftest.py): a module that uses an expensive
session fixture shares a unit with every other module using it, so no worker builds it twice."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from tests.conftest import HEAVIEST_FIRST, SHARED_WORK, work_unit

TESTS = Path(__file__).resolve().parent


def test_modules_sharing_a_session_fixture_are_one_unit() -> None:
    for fixture, modules in SHARED_WORK.items():
        users = {p.stem for p in TESTS.glob("test_*.py") if re.search(rf"\b{fixture}\b", p.read_text())}
        assert users and users <= set(modules), (fixture, sorted(users - set(modules)))
        assert {work_unit(f"tests/{m}.py::test_x[a]") for m in modules} == {fixture}
    assert work_unit("tests/test_train.py::test_x") == "test_train"
    names = {p.stem for p in TESTS.glob("test_*.py")} | set(SHARED_WORK)
    assert set(HEAVIEST_FIRST) <= names, sorted(set(HEAVIEST_FIRST) - names)


def test_xdist_still_asks_split_scope_for_the_unit() -> None:
    """The scheduler hook overrides ``_split_scope`` of xdist's scope scheduling, a private method: if a
    release stopped calling it, every module would be split across workers with its fixtures built twice."""
    from xdist.scheduler import LoadScopeScheduling

    assert "self._split_scope(" in inspect.getsource(LoadScopeScheduling.schedule)
