"""Repository hygiene: notebooks committed clean and well-formed, environment.yml in step with pyproject."""

import json
import os
import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
PARAMETERS = {"profile", "data_dir", "work_dir", "device", "seed"}


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks/NN_*.ipynb found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    dirty = [
        i
        for i, c in enumerate(nb["cells"])
        if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count"))
    ]
    assert not dirty, f"{path.name}: cells {dirty} have outputs; run `nbstripout {path}`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_badge_setup_and_parameters(path):
    nb = json.loads(path.read_text())
    cells = nb["cells"]
    first = "".join(cells[0]["source"])
    badge = re.search(
        r"colab\.research\.google\.com/github/[^)\s]+/blob/[^/)\s]+/notebooks/([^)\s]+\.ipynb)", first
    )
    assert badge and badge.group(1) == path.name, (
        f"{path.name}: first cell needs a Colab badge pointing at itself"
    )
    sources = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    assert any("google.colab" in s and "pip install" in s for s in sources[:2]), (
        f"{path.name}: setup cell missing"
    )
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: exactly one cell must be tagged 'parameters'"
    names = set(re.findall(r"^(\w+)\s*=", "".join(tagged[0]["source"]), flags=re.M))
    assert PARAMETERS <= names, f"{path.name}: parameters cell lacks {PARAMETERS - names}"
    assert re.search(r'^profile\s*=\s*"ci"', "".join(tagged[0]["source"]), flags=re.M)


def _name(req: str) -> str:
    return re.split(r"[<>=!~ \[]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _spec(req: str) -> str:
    return req.strip()[len(_name(req)) :].replace(" ", "")


def test_environment_yml_lists_the_same_packages_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in ("book", "dev"):
        reqs += project["optional-dependencies"][extra]
    pyproject = {_name(r): _spec(r) for r in reqs}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = {}
    for dep in env["dependencies"]:
        if isinstance(dep, str) and not dep.startswith(("python=", "pip")):
            name = _name(dep)
            conda["torch" if name == "pytorch" else name] = _spec(dep)
    assert conda == pyproject


def test_workflow_groups_runs_by_ref_caches_pip_and_deploys_one_at_a_time():
    """A pull request's run must never cancel main's deploy: runs are grouped per ref, and only the deploy
    job shares the `pages` group (never cancelled)."""
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "book.yml").read_text())
    group = workflow["concurrency"]["group"]
    assert "github.ref" in group and "pages" not in group
    assert "pull_request" in str(workflow["concurrency"]["cancel-in-progress"])
    deploy = workflow["jobs"]["deploy"]
    assert deploy["concurrency"] == {"group": "pages", "cancel-in-progress": False}
    assert "refs/heads/main" in deploy["if"]
    setup = next(s for s in workflow["jobs"]["build"]["steps"] if "setup-python" in s.get("uses", ""))
    assert setup["with"]["cache"] == "pip"
    assert "actionlint" in (ROOT / "Makefile").read_text().split("\nlint:")[1].split("\n\n")[0]


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert "make test" in (ROOT / "README.md").read_text()


# --------------------------------------------------------------------------------------------------
# The book-build tooling is the repository's, not the installed package's
# --------------------------------------------------------------------------------------------------

BOOK_TOOLS = ("runbook", "bookpages", "browser_check", "smoke", "torchrun_check")


def test_installed_package_holds_no_book_tooling():
    """The scripts that build and check the book live in book/_tools/ and are run by path; `pip install`
    (regdiff_core, data_download) ships none of them, and nothing refers to them as package modules."""
    for name in BOOK_TOOLS:
        assert not (ROOT / "regdiff_core" / f"{name}.py").exists(), f"regdiff_core/{name}.py: book tooling"
        assert (ROOT / "book" / "_tools" / f"{name}.py").is_file(), name
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert not any(pattern.startswith("book") for pattern in find["include"]), find
    assert all(pattern.startswith(("regdiff_core", "data_download")) for pattern in find["include"]), find
    makefile = (ROOT / "Makefile").read_text()
    for name in BOOK_TOOLS:
        assert f"regdiff_core.{name}" not in makefile
        assert f"book/_tools/{name}.py" in makefile, f"no Makefile target runs book/_tools/{name}.py"


def test_book_tooling_is_linted_and_kept_out_of_the_book():
    lint = (ROOT / "Makefile").read_text().split("\nlint:")[1].split("\n\n")[0]
    check = next(line for line in lint.splitlines() if "ruff check" in line)
    fmt = next(line for line in lint.splitlines() if "ruff format --check" in line)
    assert "book/_tools" in check.split() and "book/_tools" in fmt.split()
    excluded = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["extend-exclude"]
    assert not {"book", "book/_tools", "book/_ext"} & set(excluded), excluded
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert "book/_tools" in config["exclude_patterns"]


# --------------------------------------------------------------------------------------------------
# One source for the repository address and the version: pyproject.toml
# --------------------------------------------------------------------------------------------------


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def release_ref() -> tuple[str, str]:
    """(repository URL, git ref the book installs): pyproject's Repository URL and ``v<version>``."""
    project = _project()
    return project["urls"]["Repository"].rstrip("/"), f"v{project['version']}"


def test_package_version_is_pyprojects():
    import regdiff_core

    assert regdiff_core.__version__ == _project()["version"]


def test_book_config_points_at_the_repository():
    url, _ = release_ref()
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["repository"]["url"].rstrip("/") == url


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_badge_and_setup_cell_use_the_release_ref(path):
    url, ref = release_ref()
    owner_name = re.match(r"https://github\.com/([^/]+/[^/]+)$", url)
    assert owner_name, f"pyproject's Repository URL {url!r} is not https://github.com/OWNER/NAME"
    cells = json.loads(path.read_text())["cells"]
    badge = f"https://colab.research.google.com/github/{owner_name.group(1)}/blob/{ref}/notebooks/{path.name}"
    assert f"]({badge})" in "".join(cells[0]["source"]), f"{path.name}: the Colab badge must link {badge}"
    setup = "".join(cells[1]["source"])
    install = f'%pip install -q "regdiff @ git+{url}@{ref}"'
    assert install in setup, f"{path.name}: the setup cell must run {install}"
    assert len(re.findall(r"git\+https://", setup)) == 1


def test_running_page_badges_open_the_notebooks_of_the_release_ref():
    """book/running.md's badges open the same version of each notebook as the notebooks' own badges."""
    url, ref = release_ref()
    owner_name = url.removeprefix("https://github.com/")
    text = (ROOT / "book" / "running.md").read_text()
    badges = re.findall(
        r"colab\.research\.google\.com/github/([^)\s]+)/blob/([^/)\s]+)/notebooks/([^)\s]+)", text
    )
    assert sorted(b[2] for b in badges) == [p.name for p in NOTEBOOKS]
    assert {(b[0], b[1]) for b in badges} == {(owner_name, ref)}, f"running.md's badges must open {ref}"


@pytest.mark.skipif(
    os.environ.get("REGDIFF_RELEASE_CHECK") != "1",
    reason="release check: `make release-check` (the tag v<version> is created when that version is released)",
)
def test_release_ref_exists_in_this_repository():
    """The tag the badges and setup cells name must exist, or Colab installs nothing (`git tag v<version>`)."""
    import shutil
    import subprocess

    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout (e.g. an sdist): no refs to check")
    _, ref = release_ref()
    found = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"refs/tags/{ref}^{{commit}}"],
        capture_output=True,
        text=True,
    )
    assert found.returncode == 0, (
        f"tag {ref} does not exist in this repository; the notebooks install `regdiff @ git+…@{ref}`. "
        f"Create it on the release commit: git tag {ref}"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_exercise_has_a_hidden_timed_solution_and_the_chapter_a_recap(path):
    cells = json.loads(path.read_text())["cells"]
    sources = ["".join(c["source"]) for c in cells]
    numbers = []
    for i, text in enumerate(sources):
        match = re.match(r":::\{admonition\} Exercise (\d+\.\d+) — ", text)
        if not match:
            continue
        numbers.append(match.group(1))
        solution = cells[i + 1]
        assert solution["cell_type"] == "code", (
            f"{path.name}: exercise {match.group(1)} needs a solution cell"
        )
        assert "hide-cell" in solution["metadata"].get("tags", []), f"{path.name}: solution must be collapsed"
        assert f"exercise_timer({path.stem!r}, {match.group(1)!r})" in sources[i + 1].replace('"', "'")
    assert len(numbers) >= 2, f"{path.name}: at least two exercises"
    assert len(set(numbers)) == len(numbers)
    recap = [i for i, t in enumerate(sources) if t.startswith("## What we saw")]
    assert recap and f"read_metrics({path.stem!r})" in sources[recap[0] + 1].replace('"', "'")
