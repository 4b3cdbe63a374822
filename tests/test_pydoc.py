"""API reference: every public name of largebatch renders with pydoc and carries a docstring.

Public: every module whose dotted path has no component starting with ``_``; in it the names of
its ``__all__`` (or, without one, its own classes and functions not starting with ``_``); and the
public methods and properties those classes define themselves. Rendering calls
``pydoc.render_doc`` with the dotted name, exactly what ``python -m pydoc <name>`` does, in-process.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import pydoc

import pytest

import largebatch

def public_modules():
    names = ["largebatch"]
    for info in pkgutil.walk_packages(largebatch.__path__, "largebatch."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return names


def exported_names(module):
    exported = getattr(module, "__all__", None)
    if exported is not None:
        return list(exported)
    return [
        name
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and obj.__module__ == module.__name__
    ]


def own_members(cls):
    """Public methods and properties the class defines itself (inherited ones are documented where defined)."""
    for name, member in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        if inspect.isfunction(member) or isinstance(member, property):
            yield name, member


def collect():
    """Every public dotted name, and each documentable object once, under its defining name."""
    names, documented = [], {}
    for module_name in public_modules():
        module = importlib.import_module(module_name)
        names.append(module_name)
        documented[module_name] = module
        for name in exported_names(module):
            obj = getattr(module, name)
            names.append(f"{module_name}.{name}")
            # Constants and type aliases are documented by a comment or their module's docstring.
            if not (inspect.isclass(obj) or inspect.isfunction(obj)) or not obj.__module__.startswith("largebatch"):
                continue
            defining = f"{obj.__module__}.{obj.__qualname__}"
            documented[defining] = obj
            if inspect.isclass(obj):
                for member_name, member in own_members(obj):
                    names.append(f"{module_name}.{name}.{member_name}")
                    documented[f"{defining}.{member_name}"] = member
    return sorted(set(names)), documented


NAMES, DOCUMENTED = collect()


@pytest.mark.parametrize("name", NAMES)
def test_renders_with_pydoc(name):
    text = pydoc.render_doc(name, renderer=pydoc.plaintext)
    assert name.rsplit(".", 1)[-1] in text


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_has_a_docstring_of_its_own(name):
    obj = DOCUMENTED[name]
    doc = vars(obj).get("__doc__") if inspect.isclass(obj) else obj.__doc__
    assert doc and doc.strip(), f"{name} has no docstring"
