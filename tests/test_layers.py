"""The layer rule, checked on the source: imports point down only.

blockdev <- pager <- kernelshim <- fs. Every import statement in every module of the
four packages is parsed (including imports inside functions and TYPE_CHECKING
blocks), relative imports are resolved, and the sluice packages each module reaches
are compared with the packages its layer may use.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAYERS = ("blockdev", "pager", "kernelshim", "fs")

#: the sluice packages each package may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "blockdev": set(),
    "pager": {"blockdev"},
    "kernelshim": {"blockdev", "pager"},
    "fs": {"kernelshim"},
}


def _modules(package: str) -> list[Path]:
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"no modules found in {package}/"
    return files


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    name = _module_name(path)
    is_pkg = path.name == "__init__.py"
    pkg_parts = name.split(".") if is_pkg else name.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[:len(pkg_parts) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:  # from . import x: x may be a submodule
                    out.update(f"{mod}.{a.name}" for a in node.names)
                out.add(mod)
            else:
                assert node.module is not None
                out.add(node.module)
    return out


def sluice_packages(path: Path) -> set[str]:
    return {m.split(".")[0] for m in imported_modules(path)} & set(LAYERS)


@pytest.mark.parametrize("package", LAYERS)
def test_layer_rule(package: str) -> None:
    allowed = ALLOWED[package] | {package}
    bad = {}
    for path in _modules(package):
        extra = sluice_packages(path) - allowed
        if extra:
            bad[str(path.relative_to(REPO))] = sorted(extra)
    assert not bad, f"{package} imports layers it must not: {bad}"


def test_fs_uses_only_kernelshim_below_it() -> None:
    """fs reaches the lower layers only through kernelshim, and does use it."""
    uses = set().union(*(sluice_packages(p) for p in _modules("fs")))
    assert "blockdev" not in uses and "pager" not in uses
    assert "kernelshim" in uses


def test_relative_imports_are_resolved() -> None:
    """The checker itself: relative imports count, as do imports inside functions."""
    assert "fs.errors" in imported_modules(REPO / "fs" / "allocator.py")
    assert "fs.volume" in imported_modules(REPO / "fs" / "cli.py")
    # operations.py imports kernelshim inside a function body too
    assert "kernelshim" in imported_modules(REPO / "fs" / "operations.py")
    assert sluice_packages(REPO / "pager" / "cache.py") == {"blockdev"}
    assert sluice_packages(REPO / "kernelshim" / "kernel.py") >= {"blockdev", "pager"}


def test_checker_catches_a_violation(tmp_path: Path) -> None:
    """A module of blockdev importing pager (even lazily) is reported."""
    pkg = tmp_path / "blockdev"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "bad.py").write_text("def f():\n    from pager import Pager\n    return Pager\n")
    (pkg / "bad2.py").write_text("from ..fs import errors\n")
    global REPO
    saved = REPO
    REPO = tmp_path
    try:
        assert sluice_packages(pkg / "bad.py") == {"pager"}
        assert sluice_packages(pkg / "bad2.py") == {"fs"}
        with pytest.raises(AssertionError):
            test_layer_rule("blockdev")
    finally:
        REPO = saved
