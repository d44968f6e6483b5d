"""The configshell module the nodes build on: the very one targetcli's tree is made of.

configshell-fb ships its code twice, as ``configshell`` and ``configshell_fb`` (1.1.28 in
Debian 12 and 2.0.x on PyPI alike), and the two copies' classes are distinct: a node made from
one copy's ConfigNode is not a ConfigNode to the other copy's shell (``ConfigShell.
_execute_command`` tests ``isinstance``), and its ExecutionError is not the other's. Debian's
targetcli-fb imports ``configshell_fb``, PyPI's targetcli 3.x ``configshell``. So the copy is
read off targetcli's own root node; without targetcli, ``configshell`` (the name configshell-fb
2.x documents).
"""

from __future__ import annotations

import importlib
from typing import Any

#: targetcli's root node class, or None where targetcli cannot be imported (not installed, or a
#: dependency of it missing: rtslib-fb, PyGObject)
UIRoot: Any
try:
    from targetcli import UIRoot
except ImportError:
    UIRoot = None


def _configshell_package() -> str:
    if UIRoot is None:
        return "configshell"
    base = next(c for c in UIRoot.__mro__ if c.__name__ == "ConfigNode")
    return str(base.__module__.split(".")[0])


configshell: Any = importlib.import_module(_configshell_package())
ConfigNode: Any = configshell.ConfigNode
ConfigShell: Any = configshell.ConfigShell
Console: Any = configshell.Console
ExecutionError: type[Exception] = configshell.ExecutionError
