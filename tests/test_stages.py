"""One stage table (pipeline.stages): the CLI runs it, and dvc.yaml lists exactly its parameters and code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from pipeline.stages import STAGES
from tests.conftest import REPO_ROOT


def module_path(module: str) -> Path:
    base = REPO_ROOT.joinpath(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def pipeline_imports(path: Path, lazy: bool = True) -> set[str]:
    """The pipeline modules ``path`` imports: at module level, and with ``lazy`` inside functions too."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = ast.walk(tree) if lazy else tree.body
    found: set[str] = set()
    for node in nodes:
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pipeline.model import build_model` imports the package; `from pipeline import stages`, a module
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found.update(n for n in names if n.startswith("pipeline.") and module_path(n).exists())
    return found


def code_closure(modules: tuple[str, ...]) -> set[Path]:
    """Files of ``modules`` and of every pipeline module they import, transitively.

    A module imported by name counts with its lazy imports (its functions are what the stage calls); a package
    that is only the parent of an imported module counts with its module-level imports (only those run).
    """
    named: set[str] = set()
    parents: set[str] = set()
    todo = [(module, True) for module in modules]
    while todo:
        module, by_name = todo.pop()
        if module in named or (not by_name and module in parents):
            continue
        (named if by_name else parents).add(module)
        parts = module.split(".")
        todo.extend((".".join(parts[:i]), False) for i in range(2, len(parts)))
        todo.extend((m, True) for m in pipeline_imports(module_path(module), lazy=by_name))
    return {module_path(m).relative_to(REPO_ROOT) for m in named | parents}


def dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


def test_dvc_yaml_has_exactly_the_table_s_stages_and_commands() -> None:
    declared = {name for name, stage in STAGES.items() if stage.dvc}
    assert set(dvc_stages()) == declared
    for name, stage in dvc_stages().items():
        assert stage["cmd"] == f"python -m pipeline {name}"


@pytest.mark.parametrize("name", [name for name, stage in STAGES.items() if stage.dvc])
def test_dvc_stage_lists_exactly_the_parameters_it_reads(name: str) -> None:
    assert sorted(dvc_stages()[name].get("params", [])) == sorted(STAGES[name].params)


def paths(entries: list | None) -> list[str]:
    """Paths of a dvc.yaml list whose entries are a path or ``{path: options}``."""
    return [entry if isinstance(entry, str) else next(iter(entry)) for entry in entries or []]


@pytest.mark.parametrize("name", [name for name, stage in STAGES.items() if stage.dvc])
def test_dvc_stage_has_the_table_s_inputs_and_outputs(name: str) -> None:
    stage = dvc_stages()[name]
    inputs = [path for path in paths(stage.get("deps")) if not path.startswith("pipeline")]
    outputs = paths(stage.get("outs")) + paths(stage.get("metrics")) + paths(stage.get("plots"))
    assert (sorted(inputs), sorted(outputs)) == (sorted(STAGES[name].inputs), sorted(STAGES[name].outputs))


def test_each_stage_reads_only_what_an_earlier_stage_wrote() -> None:
    """The table is a pipeline: every input is an output of a stage before it (no file from nowhere)."""
    written: set[str] = set()
    for stage in (s for s in STAGES.values() if s.dvc):
        assert set(stage.inputs) <= written, (stage.name, set(stage.inputs) - written)
        written |= set(stage.outputs)


@pytest.mark.parametrize("name", [name for name, stage in STAGES.items() if stage.dvc])
def test_dvc_stage_depends_on_all_the_code_it_runs_and_no_more(name: str) -> None:
    code = code_closure(STAGES[name].code)
    deps = [Path(d) for d in dvc_stages()[name]["deps"] if str(d).startswith("pipeline")]
    uncovered = sorted(str(f) for f in code if not any(f == d or d in f.parents for d in deps))
    # a folder is listed only when the stage runs every module in it; a file only when the stage runs it
    extra = sorted(
        str(d)
        for d in deps
        if not (REPO_ROOT / d).is_dir()
        and d not in code
        or (REPO_ROOT / d).is_dir()
        and any(f.relative_to(REPO_ROOT) not in code for f in (REPO_ROOT / d).rglob("*.py"))
    )
    expected = "\n".join(f"      - {f}" for f in sorted(map(str, code)))
    assert (uncovered, extra) == ([], []), f"dvc.yaml {name} deps should cover:\n{expected}"


def test_the_closure_follows_lazy_imports_and_packages() -> None:
    """The training stage runs the model kinds' modules through build_model's lazy imports; they are its code."""
    code = code_closure(("pipeline.training.train",))
    assert Path("pipeline/model/mamba4rec.py") in code and Path("pipeline/model/__init__.py") in code
    assert Path("pipeline/tracking/runs.py") not in code  # training logs nothing itself
    assert Path("pipeline/data/download.py") not in code  # nor reads the downloader's code


def test_cli_offers_each_stage_of_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline import cli

    with pytest.raises(SystemExit):
        cli.main(["--help"])
    shown = capsys.readouterr().out
    for stage in STAGES.values():
        assert stage.name in shown and stage.help[:40] in shown.replace("\n", " ").replace("  ", " ")
