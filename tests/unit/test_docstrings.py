"""The Example sections of the package's docstrings run and print what they show."""

import doctest
import importlib
import pkgutil

import pytest

import earlyexit_brain

MODULES = sorted(m.name for m in pkgutil.walk_packages(earlyexit_brain.__path__, "earlyexit_brain."))


def test_every_module_is_collected():
    assert "earlyexit_brain.models.conformer" in MODULES and "earlyexit_brain.policies" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed in {name}"
