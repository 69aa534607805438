"""``import remit_ext`` from a checkout's root after a plain (non-editable) install.

Python puts the current directory (``python -m ...``, ``python -c ...``) first on ``sys.path``,
so in the root of a checkout installed with ``pip install --no-build-isolation .`` the
checkout's ``remit_ext/`` shadows the installed package, and it has no compiled ``_C`` (the
build put it in the installed copy only). Rather than fail there, e.g. on ``python -m
remit_ext.bench`` or ``python -m pytest bench``, the package becomes the installed copy: the
Python code and the extension that were built and installed together. An editable install
(whose import hook supplies ``_C`` to the checkout's package) and an in-place build are left
alone.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from typing import Iterable, Optional


def installed_copy(package_dir: str, search_path: Iterable[str]) -> Optional[str]:
    """The first ``remit_ext`` directory on ``search_path``, other than ``package_dir``, with an
    ``__init__.py`` and a compiled ``_C`` beside it (None if there is none)."""
    here = os.path.realpath(package_dir)
    for entry in search_path:
        candidate = os.path.join(entry or os.getcwd(), os.path.basename(here))
        if os.path.realpath(candidate) == here:
            continue
        if os.path.isfile(os.path.join(candidate, "__init__.py")) and any(
                os.path.isfile(os.path.join(candidate, "_C" + suffix))
                for suffix in importlib.machinery.EXTENSION_SUFFIXES):
            return candidate
    return None


def use_installed_copy(name: str, package_dir: str) -> bool:
    """Called by the package's ``__init__`` before anything loads ``_C``: when this package
    cannot import ``_C`` and an installed copy can, load that copy as ``sys.modules[name]``
    (``import`` then returns it) and return True."""
    if importlib.util.find_spec(f"{name}._C") is not None:
        return False
    other = installed_copy(package_dir, sys.path)
    if other is None:
        return False
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(other, "__init__.py"), submodule_search_locations=[other])
    module = importlib.util.module_from_spec(spec)
    sys.modules.pop(__name__, None)  # the installed copy loads its own copy of this module
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return True
