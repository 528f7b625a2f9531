"""Packaging: the license file pyproject declares, project links, `make help`, the production install."""

import os
import re
import subprocess

from support import ROOT


def _read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def test_the_license_file_is_the_mit_license_pyproject_declares():
    pyproject = _read("pyproject.toml")
    assert re.search(r'^license = "MIT"$', pyproject, re.M)
    assert re.search(r'^license-files = \["LICENSE"\]$', pyproject, re.M)
    text = _read("LICENSE")
    assert text.startswith("MIT License\n") and "THE SOFTWARE IS PROVIDED \"AS IS\"" in text


def test_pyproject_links_the_api_it_speaks():
    urls = _read("pyproject.toml").split("[project.urls]\n", 1)[1].split("\n\n", 1)[0]
    assert re.findall(r'^"[^"]+" = "https://\S+"$', urls, re.M)


def test_make_help_lists_the_targets(tmp_path):
    done = subprocess.run(["make", "-s", "-C", ROOT, "help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    targets = [line.split()[1] for line in done.stdout.splitlines()]
    assert targets == ["help", "test", "run", "bench", "soak", "crash", "clean"]


def test_the_documented_production_installs_include_the_fast_extra():
    installs = [line for line in _read("README.md").splitlines() + _read("deploy/stark-challenge.service").splitlines()
                if re.search(r"\b(pip|pipx) install\b", line) and "stark_challenge" in line or "pip install ." in line]
    assert installs and all("[fast]" in line for line in installs), installs
