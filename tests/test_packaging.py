"""pyproject.toml in the form current setuptools builds without deprecation banners (they covered the first
screen of `make run`). The build itself needs the network for setuptools>=77, so this checks the form."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())


def test_license_is_an_spdx_expression_with_a_setuptools_that_reads_it() -> None:
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    # A license classifier beside an SPDX expression is an error for setuptools >= 77.
    assert not [c for c in PYPROJECT["project"]["classifiers"] if c.startswith("License ::")]
    requires = next(r for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools"))
    assert int(re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", requires).group(1)) >= 77
