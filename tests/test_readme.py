"""README.md and docs/*.md against the code: every command they show parses with its tool's own parser
(the jobs themselves are not run), the README stays a quickstart that links every guide, its Python API
runs and shows the install that gives what it calls, and the jax and flax versions it says are tested
are the ones pyproject.toml admits and this suite runs on."""

import importlib
import importlib.metadata
import re
import shlex
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
DOCS = sorted((ROOT / "docs").glob("*.md"))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def commands(text: str) -> list[list[str]]:
    """argv of every `python -m llama_jax.<tool> ...` in `text`'s bash blocks (continuation lines
    joined, `&&` chains split, comments dropped, $VARIABLES given a number)."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                argv = ["0" if word.startswith("$") else word for word in shlex.split(part, comments=True)]
                if argv[:2] == ["python", "-m"] and argv[2].startswith("llama_jax."):
                    found.append(argv[2:])
    return found


def documented_commands() -> list[tuple[str, list[str]]]:
    """(file, argv) of every tool command in README.md and docs/*.md."""
    return [(path.relative_to(ROOT).as_posix(), argv)
            for path in [ROOT / "README.md", *DOCS] for argv in commands(path.read_text())]


def section(title: str) -> str:
    return README.split(f"\n{title}\n", 1)[1].split("\n## ", 1)[0]


def extra_requirements(text: str) -> set[str]:
    """The distributions that the `pip install -e ".[extras]"` lines in `text` add to the runtime's."""
    extras = PYPROJECT["project"]["optional-dependencies"]
    named = [e for group in re.findall(r'pip install -e "\.\[([\w,-]+)\]"', text) for e in group.split(",")]
    return {Requirement(r).name for e in named for r in extras[e]}


def test_the_readme_shows_every_tool():
    assert {argv[0] for argv in commands(README)} == {"llama_jax.train", "llama_jax.infer", "llama_jax.convert",
                                                       "llama_jax.data", "llama_jax.serve", "llama_jax.reward"}


@pytest.mark.parametrize("where, argv", documented_commands(),
                         ids=[f"{where}: {' '.join(argv)}"[:90] for where, argv in documented_commands()])
def test_every_documented_command_parses_with_its_tool_s_parser(where, argv):
    cli = importlib.import_module(f"{argv[0]}.__main__")
    try:
        args = cli.build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"{where}: python -m {' '.join(argv)}: its parser refuses it (see the usage line above)")
    if argv[0] == "llama_jax.train":
        cli.train_config(args)  # the flags' combination, checked before a run touches OUT


def test_the_readme_is_a_quickstart_that_links_every_guide():
    assert len(README.splitlines()) < 160
    assert DOCS and all(f"](docs/{path.name})" in README for path in DOCS)


@pytest.mark.parametrize("path", [ROOT / "README.md", *DOCS], ids=lambda path: path.name)
def test_every_relative_link_leads_to_a_file(path):
    targets = re.findall(r"\]\((?!https?:)([^)#]+)[^)]*\)", path.read_text())
    assert [t for t in targets if not (path.parent / t).exists()] == []


def test_the_python_api_runs(tmp_path, monkeypatch):
    """The README's Python block as a reader pastes it, in an empty directory (it writes ckpt/)."""
    api = re.findall(r"```python\n(.*?)```", section("## Python API"), re.S)
    assert len(api) == 1
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(api[0], "README.md (Python API)", "exec"), scope)
    assert scope["logits"].shape == (1, len(scope["tokens"][0]), scope["cfg"].vocab_size)
    assert (tmp_path / "ckpt").is_dir()


def test_the_python_api_shows_the_install_that_gives_meta_s_tokenizer():
    api = section("## Python API")
    assert "default_tokenizer_path()" in api
    assert "llama-models" in extra_requirements(api)


@pytest.mark.parametrize("name", ["jax", "flax"])
def test_the_declared_range_is_the_tested_one(name):
    """README says which minor is tested; this suite runs on it; pyproject starts there and is bounded."""
    tested = Version(re.search(rf"Tested with .*?\b{name} (\d+\.\d+)\b", README).group(1))
    installed = Version(importlib.metadata.version(name))
    assert (installed.major, installed.minor) == (tested.major, tested.minor)
    spec = next(Requirement(r).specifier for r in PYPROJECT["project"]["dependencies"] if Requirement(r).name == name)
    assert installed in spec and tested in spec
    assert Version(f"{tested.major}.{tested.minor - 1}.99") not in spec  # nothing older than the tested minor
    assert Version(f"{tested.major}.{tested.minor + 2}") not in spec  # nor releases nobody has run
