"""Import a script of recipes/ as a module (for tests that call its functions)."""

import importlib
import os
import sys

RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "recipes")


def recipe(name: str):
    """``recipes/<name>.py`` as a module."""
    sys.path.insert(0, RECIPES)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)
