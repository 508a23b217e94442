"""Stages you can call: ``edgeship.convert(...)`` is the convert package, called.

Each stage is a subpackage (its room in the tree) whose main function has the package's
name. Importing a subpackage sets it as an attribute of ``edgeship``, which would hide a
function of the same name there; making the package itself callable keeps both
``edgeship.convert(...)`` and ``edgeship.convert.ConvertOptions`` true, whatever was
imported first.
"""

from __future__ import annotations

import sys
import types
from typing import Any, Callable


def callable_stage(module_name: str, function: Callable[..., Any]) -> None:
    """Make the module ``module_name`` callable as ``function``."""

    class Stage(types.ModuleType):
        __doc__ = function.__doc__

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return function(*args, **kwargs)

    sys.modules[module_name].__class__ = Stage
