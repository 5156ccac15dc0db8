"""The repository as a user meets it: nothing in it shadows an installed package, the kernels ship
inside ``distill`` (editable and wheel), and the code cites only files that are in the repository."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


@pytest.mark.slow
def test_repository_root_does_not_shadow_the_kernels_package():
    """Python started at the root puts the root first on sys.path: a top-level ``kernels`` there hid
    the Hugging Face ``kernels`` package that transformers imports as it loads."""
    installed = importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")  # a test extra
    where = _run(["-c", "import kernels; print(kernels.__file__)"], ROOT)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).resolve() == Path(installed).resolve(), where.stdout
    for args in (["-c", "from transformers import LlamaForCausalLM"], ["-m", "distill", "--help"],
                 ["-m", "benchmarks", "--help"]):
        proc = _run(args, ROOT)
        assert proc.returncode == 0, f"{args}: {proc.stderr[-2000:]}"


def test_editable_install_serves_the_kernels_from_the_package():
    import distill.kernels.divergence as kdiv

    assert Path(kdiv.__file__).resolve() == ROOT / "distill" / "kernels" / "divergence.py"


@pytest.mark.slow
def test_wheel_installs_the_kernels_inside_distill(tmp_path):
    """A wheel built from the tracked files holds ``distill/kernels/`` and no top-level ``kernels``;
    installed on its own it serves ``distill.kernels``, the recipes and the shipped models."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    src = tmp_path / "src"
    for name in filter(None, files.stdout.split("\0")):
        if (ROOT / name).is_file():  # tracked and not deleted in the working tree
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((ROOT / name).read_bytes())
    for name in ("distill/kernels/__init__.py", "distill/kernels/divergence.py", "distill/kernels/cross_entropy.py"):
        (src / name).write_bytes((ROOT / name).read_bytes())  # also before they are committed
    built = _run(["-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
                  str(src)], tmp_path)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("distill-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "distill/kernels/divergence.py" in names and "distill/recipes/config.yaml" in names
    assert not [n for n in names if n.split("/")[0] in ("kernels", "kernels.py")]
    # Every subpackage of the checkout is in the wheel (pyproject.toml lists them by name).
    packages = [p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "distill").rglob("__init__.py")]
    assert [p for p in packages if f"{p}/__init__.py" not in names] == []
    site = tmp_path / "site"
    installed = _run(["-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)], tmp_path)
    assert installed.returncode == 0, installed.stderr[-3000:]
    # From a directory outside the checkout, with the installed copy first on the path.
    code = ("import distill, distill.kernels.divergence as d; from distill.kernels import cross_entropy; "
            "from distill.config import register; import importlib.resources as r; "
            "print(d.__file__); print(r.files('distill.recipes').joinpath('config.yaml').is_file())")
    proc = _run(["-c", code], tmp_path, PYTHONPATH=str(site))
    assert proc.returncode == 0, proc.stderr[-3000:]
    kernel_file, recipes = proc.stdout.split()
    assert Path(kernel_file).is_relative_to(site) and recipes == "True"


def test_code_cites_only_files_in_the_repository():
    """A path named in the code's docstrings and comments (``something.md`` and the like) exists."""
    cited = re.compile(r"(?:\.\./)*[\w./-]+/[\w.-]+\.(?:md|py|json|yaml)\b")
    missing = []
    for path in [*ROOT.glob("distill/**/*.py"), *ROOT.glob("benchmarks/*.py")]:
        for name in cited.findall(path.read_text()):
            placeholder = any(part.split(".")[0].isupper() for part in name.split("/"))  # DIR/, SUITE.json
            if placeholder or "{" in name or name.startswith(("outputs/", "runs/")):
                continue
            found = [p for p in ((ROOT / name).resolve(), (path.parent / name).resolve()) if p.exists()]
            if not any(p.is_relative_to(ROOT) for p in found):
                missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert not missing, missing


def test_the_environment_is_the_lock():
    """A .venv that make built holds every package at the version of requirements.lock (less the
    packages of a torch the user put there first). Other environments (make lock's scratch one, a
    hand-made one) are not built from the lock: nothing to compare."""
    constraints = Path(sys.prefix) / "constraints.txt"
    if not constraints.is_file():
        pytest.skip("this environment was not built by make from requirements.lock")
    lock = {line.split("==")[0] for line in (ROOT / "requirements.lock").read_text().splitlines()
            if "==" in line and not line.startswith("#")}
    pins = [line.split("==") for line in constraints.read_text().splitlines() if "==" in line]
    assert {name for name, _ in pins} <= lock and pins
    wrong = []
    for name, version in pins:
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # pinned for whoever needs it; nothing here does (a platform's extra)
        if installed.split("+")[0] != version:
            wrong.append(f"{name} {installed} (lock: {version})")
    assert not wrong, wrong


def test_the_layers_hold_and_an_upward_import_breaks_them(tmp_path):
    """The .importlinter contracts pass on distill as it is, and fail once a low layer imports a
    high one (the reference losses importing the plan) or a source imports the draw above it."""
    lint = [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"]
    assert _run(lint, ROOT).returncode == 0, _run(lint, ROOT).stdout
    for module, planted, broken in (("losses.py", "from distill import plan", "distill.losses is not allowed to "
                                     "import distill.plan"),
                                    ("sources/base.py", "from distill.sources import mixture",
                                     "distill.sources.base is not allowed to import distill.sources.mixture")):
        copy = tmp_path / module.replace("/", "_")
        shutil.copytree(ROOT / "distill", copy / "distill")
        (copy / ".importlinter").write_text((ROOT / ".importlinter").read_text())
        target = copy / "distill" / module
        target.write_text(target.read_text() + f"\n{planted}  # noqa\n")
        out = _run(lint, copy, PYTHONPATH=str(copy))
        assert out.returncode != 0 and broken in out.stdout, out.stdout


def test_ci_refuses_a_commit_subject_over_72_characters(tmp_path):
    """.ci/check-subjects passes subjects of up to 72 characters after its base and names a longer one."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                              capture_output=True, text=True).stdout.strip()

    check = [str(ROOT / ".ci" / "check-subjects")]
    git("init", "-q")
    for subject in ("base", "x" * 72):
        git("commit", "-q", "--allow-empty", "-m", subject)
    base = git("rev-list", "--max-parents=0", "HEAD")
    assert subprocess.run([*check, base], cwd=tmp_path).returncode == 0
    git("commit", "-q", "--allow-empty", "-m", "y" * 73, "-m", "a body may be long " * 10)
    out = subprocess.run([*check, base], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 1 and "y" * 73 in out.stderr and "x" * 72 not in out.stderr
