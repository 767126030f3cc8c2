"""The package as users install it: the wheel carries the configs and recipes, ``qat-train`` runs from a
wheel anywhere, the package list in pyproject matches the tree, and no module of ``qat`` imports
another that imports it back."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from qat.config import config_dir, recipe_names, recipes_dir

ROOT = Path(__file__).resolve().parent.parent


def _modules() -> dict[str, Path]:
    mods = {}
    for path in (ROOT / "qat").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """Module -> the ``qat`` modules it imports, at the top or inside a function (both run at some point)."""
    mods = _modules()

    def owner(name: str) -> str:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {owner(a.name) for a in node.names if a.name.split(".")[0] == "qat"}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                if base.split(".")[0] == "qat":
                    deps |= {owner(f"{base}.{a.name}") if f"{base}.{a.name}" in mods else owner(base) for a in node.names}
        deps.discard(mod)
        graph[mod] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle_and_a_clean_graph_has_none():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle_in_qat():
    graph = import_graph()
    assert "qat.train" in graph and "qat.config" in graph["qat.train"]  # the walker sees our imports
    assert cycles(graph) == []


def test_pyproject_lists_every_package_of_the_tree():
    """Two packages map to top-level folders (configs/, recipes/), so the list is explicit: it must stay whole."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = {"qat": ROOT / "qat", **{name: ROOT / folder for name, folder in setuptools["package-dir"].items()}}
    tree = set()
    for name, folder in mapped.items():
        for d in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
            if "__pycache__" not in d.parts and (d == folder or any(d.glob("*.py")) or any(d.glob("*.yaml")) or any(d.glob("*.txt"))):
                rel = d.relative_to(folder).parts
                nested = [n for n in mapped if n != name and n.startswith(name + ".") and d.is_relative_to(mapped[n])]
                if not nested:
                    tree.add(".".join([name, *rel]))
    assert set(setuptools["packages"]) == tree


def test_configs_and_recipes_are_found_and_not_linked():
    assert (config_dir() / "train.yaml").is_file()
    assert not any(p.is_symlink() for p in config_dir().rglob("*")) and not any(p.is_symlink() for p in recipes_dir().rglob("*"))
    assert "smollm2_w4_lsq" in recipe_names() and "smollm2_lsq_optuna" in recipe_names("hparams_search")


@pytest.mark.slow
def test_wheel_installs_and_trains_from_any_directory(tmp_path):
    """``pip wheel .``, the wheel into a fresh virtual environment, ``qat-train`` from a folder outside the checkout.

    The environment gets the wheel alone (``--no-deps``) and reaches the installed dependencies
    (torch, transformers, the embedded models) through a ``.pth`` line, so nothing is downloaded;
    the checkout's ``qat`` is not on its path.
    """
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)],
                   check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = wheels.glob("qat-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "qat/configs/train.yaml" in names and "qat/recipes/experiment/smollm2_w4_lsq.yaml" in names
    assert "qat/data/pydoc_topics.txt" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "QAT_TRACEBACK")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline")
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import qat.config; print(qat.config.config_dir())"],
                           check=True, capture_output=True, text=True, cwd=elsewhere, env=env).stdout.strip()
    assert Path(where).is_relative_to(site), where  # the wheel's own copy of the configs
    run_dir = elsewhere / "run"
    # small blocks and a small held-out split: what is tested is the installed package, not the perplexity (full-size
    # evaluations of FP, PTQ and QAT on both texts took about 20 of this test's minutes)
    small = ["data.seq_len=32", "data.batch_size=2", "data.eval_batch_size=2", "data.heldout_tokens=64"]
    out = subprocess.run([str(venv / "bin" / "qat-train"), "recipe=smollm2_w4_lsq", "trainer.max_steps=2", *small, f"hydra.run.dir={run_dir}"],
                         capture_output=True, text=True, cwd=elsewhere, env=env, timeout=1800)
    assert out.returncode == 0, out.stderr[-4000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["recipe"] == "smollm2_w4_lsq" and metrics["steps"] == 2 and metrics["ppl_qat"] > 0
