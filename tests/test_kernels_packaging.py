"""The kernel sources ship inside the package: a non-editable install must find every one.

`sources.kernel_dir()` is the package's own ``mfa/kernels/metal`` and pyproject's package data
lists every file there (checked here without building a wheel; `pip install . --target DIR`
then importing from DIR is the end-to-end check).
"""

import fnmatch
import sys
from pathlib import Path

import pytest

import mfa
from mfa.kernels import sources

ROOT = Path(__file__).resolve().parents[1]


def test_kernel_dir_is_inside_the_package(monkeypatch):
    monkeypatch.delenv("MFA_KERNEL_DIR", raising=False)
    package = Path(mfa.__file__).resolve().parent
    assert sources.kernel_dir() == package / "kernels" / "metal"
    for name in sources.KERNELS:
        assert sources.body(name)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is Python >= 3.11")
def test_package_data_lists_every_kernel_source():
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["mfa.kernels"]
    package = ROOT / "mfa" / "kernels"
    files = [p.relative_to(package).as_posix() for p in (package / "metal").rglob("*") if p.is_file()]
    assert files
    missing = [f for f in files if not any(fnmatch.fnmatchcase(f, pat) and f.count("/") == pat.count("/")
                                           for pat in patterns)]
    assert not missing, f"kernel sources not shipped by pyproject's package-data: {missing}"
