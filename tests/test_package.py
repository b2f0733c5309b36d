"""The package's modules: each one imports on its own, whatever was imported before it."""

import subprocess
import sys

import pytest

import sdhelpers.data
import sdhelpers.shapes_dataset

IMPORT_EACH_FIRST = """
import importlib, pkgutil, sys
import sdhelpers
names = sorted(m.name for m in pkgutil.iter_modules(sdhelpers.__path__))
for name in names:
    for key in [k for k in sys.modules if k == "sdhelpers" or k.startswith("sdhelpers.")]:
        del sys.modules[key]
    try:
        importlib.import_module(f"sdhelpers.{name}")
    except Exception as error:
        print(f"sdhelpers.{name}: {error!r}")
print(len(names), "modules")
"""


def test_every_module_imports_when_it_is_the_first_one_imported():
    # A reader's script may start with any module; a circular import shows only when the module
    # that closes the circle comes first, so each is imported after every sdhelpers module has been
    # dropped from sys.modules (in a child interpreter, leaving this one's modules alone).
    done = subprocess.run([sys.executable, "-c", IMPORT_EACH_FIRST], capture_output=True, text=True,
                          timeout=300, check=True)
    lines = done.stdout.strip().splitlines()
    assert int(lines[-1].split()[0]) > 40, done.stdout
    assert lines[:-1] == [], "\n".join(lines[:-1])


def test_the_dataset_keeps_its_old_name_in_data():
    assert sdhelpers.data.ShapesDataset is sdhelpers.shapes_dataset.ShapesDataset
    with pytest.raises(AttributeError, match="NoSuchThing"):
        sdhelpers.data.NoSuchThing  # noqa: B018
