"""Every benchmark in scripts/ still imports against the package (a moved module breaks them
silently otherwise: they are run by hand, not by the suite)."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

SCRIPTS = sorted(p for p in (pathlib.Path(__file__).parent.parent / "scripts").glob("*.py"))


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_script_imports(path):
    spec = importlib.util.spec_from_file_location(f"_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module            # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)        # module level only: main() runs under __main__
    finally:
        del sys.modules[spec.name]
    assert callable(getattr(module, "main", None)), f"{path.name} has no main()"
