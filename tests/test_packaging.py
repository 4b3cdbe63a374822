"""What ships with the package: the license, the metadata, the py.typed marker, and the README
(the package's long description) where it states facts the code defines: the install and test
commands CI runs, every constructor default, and a training loop that runs."""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import inspect
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from torch import nn

from largebatch import LAMB, LARS, AdaGradNorm, Adan

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
CI_RUN = (REPO / ".ci" / "run").read_text()
# sha256 of the Apache License 2.0 text as the ASF publishes it (apache.org/licenses/LICENSE-2.0.txt).
APACHE_2_0_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"


@pytest.fixture(scope="module")
def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_license_file_is_the_unmodified_apache_2_0_text():
    assert hashlib.sha256((REPO / "LICENSE").read_bytes()).hexdigest() == APACHE_2_0_SHA256


def test_pyproject_declares_the_spdx_license_with_a_backend_that_reads_it(pyproject):
    project = pyproject["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    # PEP 639: a license expression and a License classifier must not both be given.
    assert not [c for c in project.get("classifiers", []) if c.startswith("License ::")]
    (setuptools,) = [Requirement(r) for r in pyproject["build-system"]["requires"] if r.startswith("setuptools")]
    assert not setuptools.specifier.contains("76.1") and setuptools.specifier.contains("77.0")


def test_pyproject_has_project_urls_and_ships_py_typed(pyproject):
    urls = pyproject["project"]["urls"]
    assert {"Homepage", "Source", "Issues"} <= set(urls)
    assert all(url.startswith("https://") for url in urls.values())
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["largebatch"]
    marker = REPO / "largebatch" / "py.typed"
    assert marker.is_file() and marker.read_text() == ""  # empty: the whole package is typed (PEP 561)


BUILD = """
import sys, warnings
warnings.simplefilter("always")
from setuptools import build_meta
out = sys.argv[1]  # read once: the build rewrites sys.argv
print("wheel", build_meta.build_wheel(out))
print("sdist", build_meta.build_sdist(out))
"""


def test_built_wheel_and_sdist_carry_license_urls_and_py_typed(tmp_path, pyproject):
    """Build from a copy of the sources (the build writes build/ and *.egg-info next to them)."""
    (backend,) = [Requirement(r) for r in pyproject["build-system"]["requires"] if r.startswith("setuptools")]
    installed = importlib.metadata.version("setuptools")
    assert backend.specifier.contains(installed), f"setuptools {installed} cannot build this: install the test extra"
    source, out = tmp_path / "src", tmp_path / "dist"
    shutil.copytree(REPO / "largebatch", source / "largebatch", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    done = subprocess.run([sys.executable, "-c", BUILD, str(out)], cwd=source, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    log = done.stdout + done.stderr
    assert not [line for line in log.splitlines() if "warning" in line.lower() and "licen" in line.lower()], log

    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read("largebatch-0.1.0.dist-info/METADATA").decode()
    assert {"largebatch/py.typed", "largebatch-0.1.0.dist-info/licenses/LICENSE"} <= names
    headers = metadata.split("\n\n", 1)[0].splitlines()
    assert "License-Expression: Apache-2.0" in headers and "License-File: LICENSE" in headers
    assert not [h for h in headers if h.startswith("License:")]  # the deprecated free-text field
    assert {h for h in headers if h.startswith("Project-URL:")} == {
        f"Project-URL: {label}, {url}" for label, url in pyproject["project"]["urls"].items()
    }

    (sdist,) = out.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        members = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"LICENSE", "largebatch/py.typed", "pyproject.toml"} <= members


# --- the README ---------------------------------------------------------------------------------


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced block, in order."""
    return [(lang, body.strip()) for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, re.S)]


def section(title: str) -> str:
    start = README.index(f"\n{title}\n")
    end = README.find("\n#", start + len(title) + 2)
    return README[start:end if end != -1 else None]


def ci_test_command() -> str:
    commands = [line for line in CI_RUN.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return commands[-1].strip()


def ci_pin(package: str) -> str:
    (version,) = set(re.findall(rf"\b{package}==([\w.+]+)", CI_RUN))
    return version


def test_readme_starts_with_install_then_one_demo_command_then_ci_test_command():
    assert README.split("\n## ", 2)[1].startswith("Install, demo, tests\n")
    (install_lang, install), (_, demo), (_, tests) = code_blocks(README)[:3]
    assert install_lang == "bash" and 'pip install -e ".[demo,test]"' in install
    assert demo == "python -m largebatch.demo"
    assert tests == ci_test_command() == "TRITON_INTERPRET=1 python -m pytest -n auto tests"


def test_readme_install_clones_and_pins_what_ci_installs(pyproject):
    install = code_blocks(README)[0][1].splitlines()
    assert install[0] == f"git clone {pyproject['project']['urls']['Source']}.git"
    torch_line = next(line for line in install if "install torch" in line)
    assert torch_line.startswith(f"pip install torch=={ci_pin('torch')} ")
    assert "--index-url https://download.pytorch.org/whl/cpu" in section("## Install, demo, tests")
    assert any(f"triton=={ci_pin('triton')}" in line for line in install)
    assert "these machines" not in section("## Install, demo, tests")


OPTIMIZERS = {"LAMB": LAMB, "LARS": LARS, "Adan": Adan, "AdaGradNorm": AdaGradNorm}


def defaults_table() -> dict[str, dict[str, object]]:
    """{optimizer: {argument: value}} from the README's "defaults" column ("name value, ...")."""
    table = {}
    for line in section("## Optimizers").splitlines():
        row = re.match(r"\| `(\w+)` \| ([^|]*) \|", line)
        if row:
            pairs = re.findall(r"(\w+) (\([^)]*\)|[^,]+)", row.group(2))
            table[row.group(1)] = {name: ast.literal_eval(value.strip()) for name, value in pairs}
    return table


def constructor_defaults(cls: type) -> dict[str, object]:
    """The hyper-parameters before the keyword-only options, with their defaults."""
    return {
        name: p.default
        for name, p in inspect.signature(cls).parameters.items()
        if p.kind is p.POSITIONAL_OR_KEYWORD and name != "params"
    }


def test_readme_defaults_table_lists_every_constructor_default():
    table = defaults_table()
    assert set(table) == set(OPTIMIZERS)
    for name, cls in OPTIMIZERS.items():
        expected = constructor_defaults(cls)
        assert table[name] == expected, name
        for argument, value in expected.items():  # True == 1 and False == 0: check bools by type
            assert isinstance(table[name][argument], bool) == isinstance(value, bool), (name, argument)


def test_readme_lists_every_keyword_only_option():
    sentence = re.search(r"keyword-only ([^;]*);", section("## Optimizers").replace("\n", " ")).group(1)
    listed = set(re.findall(r"`(\w+)`", sentence))
    common = set(re.findall(r"`(\w+)`", sentence.split("(")[0]))  # the options some have follow in brackets
    for cls in OPTIMIZERS.values():
        keyword_only = {n for n, p in inspect.signature(cls).parameters.items() if p.kind is p.KEYWORD_ONLY}
        assert common <= keyword_only <= listed, cls.__name__


def training_loop_blocks() -> list[str]:
    return [body for lang, body in code_blocks(section("### Using it in a training loop")) if lang == "python"]


def test_training_loop_uses_grad_scaler_with_fp16_only():
    blocks = training_loop_blocks()
    assert len(blocks) == 2
    for body in blocks:
        assert ("GradScaler" in body) == ("dtype=torch.float16" in body), body
        assert ("dtype=torch.bfloat16" in body) != ("dtype=torch.float16" in body)


def test_training_loop_runs_on_cpu():
    """Both loops, in order (the fp16 one reuses the first one's optimizer), with autocast on CPU."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    loader = [(torch.randn(32, 8), torch.randint(0, 4, (32,))) for _ in range(3)]
    namespace = {"model": model, "loader": loader, "loss_fn": nn.CrossEntropyLoss()}
    for body in training_loop_blocks():
        before = [p.detach().clone() for p in model.parameters()]
        exec(compile(body.replace('"cuda"', '"cpu"'), "README.md", "exec"), namespace)
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert namespace["opt"].state[model[0].weight]["step"].item() == 6
