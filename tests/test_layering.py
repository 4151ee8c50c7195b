"""The dependency direction alignment <- cache_builder <- fuse_trainer holds in every module's imports."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {"alignment": {"cache_builder", "fuse_trainer"}, "cache_builder": {"fuse_trainer"}, "fuse_trainer": set()}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependency_direction(package):
    for module in sorted((REPO / package).glob("*.py")):
        wrong = imported_packages(module) & FORBIDDEN[package]
        assert not wrong, f"{module.relative_to(REPO)} imports {sorted(wrong)}"


def test_no_pickle_in_the_packages():
    for package in FORBIDDEN:
        for module in (REPO / package).glob("*.py"):
            assert "pickle" not in imported_packages(module), module


def test_scripts_import_the_packages_without_editing_sys_path():
    """benchmarks/ and experiments/ run against the installed packages (experiments as modules: python -m)."""
    for folder in ("benchmarks", "experiments"):
        for script in (REPO / folder).glob("*.py"):
            assert "sys.path" not in script.read_text(), script.relative_to(REPO)
