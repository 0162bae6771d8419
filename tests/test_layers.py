"""The library's shape: layers without cycles, short functions, and stages that rerun when the code they run
changes."""
import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "dmdr"
# the method and its engine, the flow maths, the adapters: what a new teacher or objective plugs into
CORE = ["flow", "distill", "draws", "loop", "lora", "precision", "rl", "rl.refl", "rl.hinge", "reward_terms", "teacher",
        "sampler", "families", "models", "resume", "sharded", "zero", "files", "config"]
ABOVE_CORE = ("world", "evaluation", "report", "standins", "rewards", "stages", "tiny_clip", "prompts", "real",
              "embedded")


def module_name(f: Path) -> str:
    parts = f.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts).removesuffix(".__init__")


MODULES = {module_name(f): f for f in SRC.rglob("*.py")}


def imported(m: str, tree: ast.AST | None = None) -> set[str]:
    """The dmdr modules that module `m` (or one node of it) imports, at module level or inside functions."""
    f = MODULES[m]
    package = m if f.name == "__init__.py" else m.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree or ast.parse(f.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out |= {n for n in names if n in MODULES and n != m}
    return out


def closure(start: set[str]) -> set[str]:
    seen, todo = set(), list(start)
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += imported(m)
    return seen


def test_no_import_cycles():
    for m in MODULES:
        assert m not in closure(imported(m)), f"{m} imports itself through {sorted(closure(imported(m)))}"


@pytest.mark.parametrize("core", CORE)
def test_the_core_imports_nothing_from_the_world_evaluation_or_report(core):
    above = sorted(m for m in closure(imported(f"dmdr.{core}")) if m.removeprefix("dmdr.").startswith(ABOVE_CORE))
    assert not above, f"dmdr.{core} imports {above}"


def test_adapters_do_not_import_the_method():
    assert "dmdr.distill" not in closure(imported("dmdr.families"))


def test_functions_are_short():
    """One screen each: at most 80 lines (the generic loop, dmdr.loop.run, included)."""
    long = []
    for m, f in MODULES.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{m}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long


def test_each_stage_depends_on_the_code_it_runs():
    """Every dmdr module a stage's entry point (dmdr.stages.<stage>) imports, directly or through others, is a
    dependency of the stage in dvc.yaml, so that DVC reruns the stage when that code changes."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    entry_points = {n.name: n for n in ast.parse(MODULES["dmdr.stages"].read_text()).body
                    if isinstance(n, ast.FunctionDef)}
    for name, stage in stages.items():
        deps = {str(d) for d in (stage.get("do", stage)["deps"])}
        used = closure(imported("dmdr.stages", entry_points[name])) | {"dmdr.stages"}
        missing = sorted(m for m in used if not any(str(MODULES[m].relative_to(ROOT)) == d
                                                    or str(MODULES[m].relative_to(ROOT)).startswith(d + "/") for d in deps))
        assert not missing, f"stage {name} runs {missing}, which are not among its deps in dvc.yaml"

