"""environment.yml defers to pyproject.toml; the two must not drift apart."""
import re
import sys
from pathlib import Path

import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def _env():
    return yaml.safe_load((ROOT / "environment.yml").read_text())


def _pip_section():
    return next(d["pip"] for d in _env()["dependencies"] if isinstance(d, dict))


def test_environment_installs_the_project_through_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = set(project["optional-dependencies"])
    editable = [line for line in _pip_section() if line.startswith("-e .")]
    assert len(editable) == 1
    assert set(re.search(r"\[(.*)\]", editable[0]).group(1).split(",")) == extras


def test_environment_lists_no_python_package_of_its_own():
    # Only torch (pinned, see scripts/setup_venv.sh) may appear besides the project.
    names = [re.split(r"[<>=\[ ]", line)[0] for line in _pip_section() if not line.startswith("-e")]
    assert names == ["torch"]
    conda = [d for d in _env()["dependencies"] if isinstance(d, str)]
    assert {re.split(r"[<>=]", d)[0] for d in conda} <= {"python", "pip", "libsndfile"}


def test_torch_pin_matches_the_setup_script():
    pin = next(line for line in _pip_section() if line.startswith("torch"))
    script = (ROOT / "scripts" / "setup_venv.sh").read_text()
    assert f'TORCH_VERSION:-{pin.split("==")[1]}' in script


def test_python_version_satisfies_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    minimum = tuple(int(x) for x in project["requires-python"].lstrip(">=").split("."))
    python = next(d for d in _env()["dependencies"] if isinstance(d, str) and d.startswith("python="))
    assert tuple(int(x) for x in python.split("=")[1].split(".")) >= minimum


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make bench" in readme
