"""The two ways to install the package (`pip install ./python` and
`pip install .` from the repository root) describe the same package."""

import os

import pytest

tomllib = pytest.importorskip("tomllib")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _load(path):
    if not os.path.exists(path):
        pytest.skip(f"{path} is not in this checkout")
    with open(path, "rb") as f:
        return tomllib.load(f)


def test_root_and_python_pyproject_agree():
    root = _load(os.path.join(ROOT, "pyproject.toml"))
    sub = _load(os.path.join(ROOT, "python", "pyproject.toml"))
    assert root["build-system"] == sub["build-system"]
    pr, ps = dict(root["project"]), dict(sub["project"])
    # each names the same file, python/README.md, relative to itself
    assert pr.pop("readme") == "python/README.md" and ps.pop("readme") == "README.md"
    assert pr == ps

    import libattn

    assert libattn.__version__ == ps["version"]
    skr, sks = root["tool"]["scikit-build"], sub["tool"]["scikit-build"]
    assert skr["cmake"]["source-dir"] == "." and sks["cmake"]["source-dir"] == ".."
    assert skr["wheel"]["packages"] == ["python/libattn"]
    assert sks["wheel"]["packages"] == ["libattn"]
    assert skr["wheel"]["install-dir"] == sks["wheel"]["install-dir"] == "libattn"
    assert skr["cmake"]["define"] == sks["cmake"]["define"]
