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


# -- re-exports: fs may not reach blockdev or pager through kernelshim either ---------------

#: The vocabulary every layer shares (ids, the bank snapshot type, the error base and
#: the device's error kinds, the units of sizes and rates): defined in blockdev because
#: it is the lowest layer, part of kernelshim's interface by re-export. Naming these is
#: not reaching around.
VOCABULARY = {"PrincipalId", "BlockNo", "ROOT_PRINCIPAL", "BankNode", "BankTree",
              "SluiceError", "FormatError", "ChecksumError", "DeviceError", "DeviceFull",
              "Rate", "UnitError", "parse_size", "format_size", "format_size_approx"}

#: The only code above kernelshim allowed to name the lower layers' parts (through
#: kernelshim's re-exports): the one place that wires a mounted volume together
#: (fs/mount.py), and the offline path of mkfs (fs/volume.py) and fsck (fs/fsck.py),
#: which open the device with no daemon running.
WIRING_AND_OFFLINE = {"fs/mount.py", "fs/volume.py", "fs/fsck.py"}


def imported_names(path: Path) -> set[tuple[str, str]]:
    """(module, name) for every `from module import name` in `path` (absolute only)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[tuple[str, str]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.update((node.module, a.name) for a in node.names)
    return out


def _lower_layer_objects() -> dict[int, str]:
    """id(object) -> 'package.module.name' for every public non-primitive object the
    modules of blockdev and pager define or export."""
    import importlib
    import pkgutil
    out: dict[int, str] = {}
    for pkg_name in ("blockdev", "pager"):
        pkg = importlib.import_module(pkg_name)
        mods = [pkg] + [importlib.import_module(f"{pkg_name}.{m.name}")
                        for m in pkgutil.iter_modules(pkg.__path__)]
        for mod in mods:
            out[id(mod)] = mod.__name__
            for k, v in vars(mod).items():
                if k.startswith("_") or isinstance(v, (int, float, str, bytes, bool,
                                                       type(None), tuple, frozenset)):
                    continue
                if getattr(v, "__module__", "").split(".")[0] in ("blockdev", "pager") \
                        or isinstance(v, dict):
                    out.setdefault(id(v), f"{mod.__name__}.{k}")
    return out


def reached_around(files: list[Path]) -> dict[str, list[str]]:
    """Names that modules of `files` import from kernelshim (or anything) which are
    really blockdev's or pager's objects, by identity: re-exports included."""
    import importlib
    lower = _lower_layer_objects()
    bad: dict[str, list[str]] = {}
    for path in files:
        for module, name in sorted(imported_names(path)):
            top = module.split(".")[0]
            if top not in LAYERS or top == "fs" or name in VOCABULARY:
                continue
            try:
                obj = getattr(importlib.import_module(module), name)
            except AttributeError:  # a submodule: `from kernelshim import client`
                obj = importlib.import_module(f"{module}.{name}")
            if top in ("blockdev", "pager") or id(obj) in lower:
                bad.setdefault(str(path.relative_to(REPO)), []).append(
                    f"{module}.{name} is {lower.get(id(obj), module + '.' + name)}")
    return bad


def test_fs_does_not_reach_lower_layers_through_reexports() -> None:
    """The metadata server's code names nothing of blockdev or pager, not even through
    kernelshim's re-exports; only the wiring and the offline path may (and they are
    the only exceptions: the list is here, explicitly)."""
    files = [p for p in _modules("fs")
             if str(p.relative_to(REPO)) not in WIRING_AND_OFFLINE]
    bad = reached_around(files)
    assert not bad, f"fs code reaches blockdev/pager around kernelshim: {bad}"


def test_reexport_check_catches_a_violation(tmp_path: Path) -> None:
    """The checker itself: a module importing BlockDevice through kernelshim's re-export
    (or Pager straight from pager) is reported; the shared vocabulary is not."""
    (tmp_path / "fs").mkdir()
    bad = tmp_path / "fs" / "bad.py"
    bad.write_text("from kernelshim import BlockDevice, PrincipalId\n"
                   "def f():\n    from pager import Pager\n")
    global REPO
    saved = REPO
    REPO = tmp_path
    try:
        found = reached_around([bad])
    finally:
        REPO = saved
    assert sorted(found) == ["fs/bad.py"]
    msgs = found["fs/bad.py"]
    assert len(msgs) == 2
    assert any("kernelshim.BlockDevice is blockdev" in m for m in msgs)
    assert any(m.startswith("pager.Pager") for m in msgs)


# -- a message-shaped contract: fs asks the kernel, never its parts or anyone's privates ----

#: The one module above kernelshim that may touch the kernel's parts (`kernel.pager`,
#: `kernel.device`): the wiring of a mounted volume, which starts the pager's task.
#: Everything else in fs asks the Kernel (its methods) for what it needs of them.
WIRING = {"fs/mount.py"}
#: the Kernel's parts, the layers below it
KERNEL_PARTS = {"pager", "device"}


def _filesystem_own_names() -> set[str]:
    """Every name FileSystem defines (methods and state of all its concern classes): its
    private ones may be used across fs's own modules (the concerns are one object)."""
    import importlib
    fs_cls = importlib.import_module("fs.filesystem").FileSystem
    names: set[str] = set()
    for cls in fs_cls.__mro__:
        names.update(vars(cls))
        names.update(getattr(cls, "__annotations__", {}))
    return names


def _ends_in_kernel(node: ast.expr) -> bool:
    name = node.attr if isinstance(node, ast.Attribute) else \
        node.id if isinstance(node, ast.Name) else ""
    return name.lstrip("_") == "kernel"


def reached_into(path: Path, own: set[str], *, wiring: bool = False) -> list[str]:
    """Where `path` reaches into the kernel's parts (`<...>kernel.pager`/`.device`;
    allowed to the `wiring`) or into another object's private attribute (`x._name`, x
    not self/cls, `_name` not one of FileSystem's own), as 'line: expression'."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[str] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        if node.attr in KERNEL_PARTS and _ends_in_kernel(node.value):
            if not wiring:
                out.append(f"{node.lineno}: {ast.unparse(node)}")
        elif node.attr.startswith("_") and not node.attr.startswith("__") and not (
                isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")) \
                and node.attr not in own:
            out.append(f"{node.lineno}: {ast.unparse(node)}")
    return sorted(out, key=lambda f: int(f.split(":")[0]))


def test_fs_asks_the_kernel_instead_of_reaching_into_it() -> None:
    """fs (but the wiring) uses no `kernel.pager` / `kernel.device`, and no module of
    fs uses a private attribute of another package's object (an ExtentMap's `_ext`, an
    Allocator's `_pending`): extents, statistics and pager events go through public
    methods (Kernel.device_statistics, Kernel.on_discarded, ExtentMap.retag_owner...)."""
    own = _filesystem_own_names()
    bad = {}
    for path in _modules("fs"):
        rel = str(path.relative_to(REPO))
        found = reached_into(path, own, wiring=rel in WIRING)
        if found:
            bad[rel] = found
    assert not bad, f"fs reaches into the kernel's parts or private attributes: {bad}"


def test_reach_into_check_catches_a_violation(tmp_path: Path) -> None:
    """The checker itself: the patterns this contract replaced are each reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f(self, node, fs):\n"
                   "    self.kernel.pager.on_discarded = None\n"
                   "    st = fs.kernel.device.statistics()\n"
                   "    for e in node.extents._ext:\n        pass\n"
                   "    n = self.alloc._pending\n"
                   "    self._fine = fs._inodes\n")
    own = _filesystem_own_names()
    found = reached_into(bad, own)
    assert [f.split(":")[0] for f in found] == ["2", "3", "4", "6"], found
    # the wiring may name the kernel's parts, but not anyone's privates either
    assert [f.split(":")[0] for f in reached_into(bad, own, wiring=True)] == ["4", "6"]
