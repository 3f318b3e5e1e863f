"""`SluiceError` for the light modules of kernelshim (the protocol and the client
library), without importing the block device.

`SluiceError` lives in `blockdev/errors.py`, a module that imports nothing but `errno`;
but importing it the ordinary way runs `blockdev/__init__.py`, which imports the device
(numpy, xxhash, trio, libc through ctypes). A direct client process should not pay for
that. So when `blockdev` is not loaded yet, `blockdev/errors.py` is loaded on its own and
registered as `blockdev.errors` in `sys.modules`: a later `import blockdev` (the daemon,
a test) finds it there and reuses it, so there is one `SluiceError` class in the
process whichever is imported first (tests/test_push.py checks both orders).

The day `blockdev/__init__.py` loads its device lazily, this module reduces to
`from blockdev.errors import SluiceError`.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType
from typing import TYPE_CHECKING


def _blockdev_errors() -> ModuleType:
    mod = sys.modules.get("blockdev.errors")
    if mod is not None:
        return mod
    if "blockdev" in sys.modules:  # the package is (being) imported: the normal way works
        import blockdev.errors
        return blockdev.errors
    pkg = importlib.util.find_spec("blockdev")  # locates the package without running it
    if pkg is None or not pkg.submodule_search_locations:
        raise ImportError("cannot find the blockdev package")
    spec = importlib.util.spec_from_file_location(
        "blockdev.errors", f"{list(pkg.submodule_search_locations)[0]}/errors.py")
    if spec is None or spec.loader is None:
        raise ImportError("cannot find blockdev/errors.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["blockdev.errors"] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules["blockdev.errors"]
        raise
    return mod


if TYPE_CHECKING:
    from blockdev.errors import SluiceError as SluiceError
else:
    SluiceError = _blockdev_errors().SluiceError
