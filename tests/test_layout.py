"""The package's shape: layers that import only downwards, no import circle, a short front door,
one command line, and a README whose Layout section names the modules where they are."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fdlib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fdlib"
TOP = len(fdlib.LAYERS)  # the front door and the command line sit above every layer


def modules(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of `package` (a folder)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports anywhere in its file (inside functions too):
    `from a.b import c` is the module `a.b.c` when that is one, else `a.b`."""
    root = name.split(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == root}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == root:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in known else node.module)
    return {m for m in found if m != name}


def rank(name: str, layers: tuple[str, ...]) -> int:
    parts = name.split(".")
    if len(parts) > 1 and parts[1] in layers:
        return layers.index(parts[1])
    return len(layers)  # the package itself, its __main__


def layering_problems(package: Path, layers: tuple[str, ...]) -> list[str]:
    """Every import of a higher layer, every module outside a layer, and every import circle."""
    mods = modules(package)
    graph = {m: imports(m, p, set(mods)) for m, p in mods.items()}
    root = package.name
    problems = [f"{m} sits in no layer" for m in mods
                if m not in (root, f"{root}.__main__") and m.split(".")[1] not in layers]
    for m, deps in graph.items():
        for d in sorted(deps):
            if rank(d, layers) > rank(m, layers):
                problems.append(f"{m} (layer {rank(m, layers)}) imports {d} (layer {rank(d, layers)})")
    # circles: depth-first search, a back edge closes one
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if d not in graph:
                continue
            if state.get(d) == 1:
                problems.append("import circle: " + " -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return problems


def test_layers_import_only_downwards_and_no_circle():
    assert layering_problems(PACKAGE, fdlib.LAYERS) == []
    assert len({m.split(".")[1] for m in modules(PACKAGE) if m.count(".") >= 1} & set(fdlib.LAYERS)) >= 4


def test_the_layering_check_finds_upward_imports_and_circles(tmp_path):
    pkg = tmp_path / "pkg"
    for folder, files in {"low": {"a.py": "from pkg.low import b\n", "b.py": "def f():\n    from pkg.low import a\n"},
                          "high": {"c.py": "x = 1\n"}}.items():
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
        for name, text in files.items():
            (pkg / folder / name).write_text(text)
    (pkg / "__init__.py").write_text("")
    (pkg / "low" / "d.py").write_text("from pkg.high import c\n")
    (pkg / "stray.py").write_text("")
    problems = layering_problems(pkg, ("low", "high"))
    assert "pkg.low.d (layer 0) imports pkg.high.c (layer 1)" in problems
    assert any(p.startswith("import circle: pkg.low.a -> pkg.low.b -> pkg.low.a") for p in problems)
    assert "pkg.stray sits in no layer" in problems


def test_front_door_is_short_lazy_and_complete():
    assert len(fdlib.__all__) <= 30
    for name in fdlib.__all__:
        assert getattr(fdlib, name) is not None
    with pytest.raises(AttributeError, match="imported from their layer"):
        fdlib.RowIntervention  # noqa: B018  (engine internals are not at the front door)
    # `import fdlib` loads no torch: names and layers load on first use
    out = subprocess.run([sys.executable, "-c", "import sys, fdlib; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_one_command_line_lists_its_commands():
    out = subprocess.run([sys.executable, "-m", "fdlib", "--help"], capture_output=True, text=True, check=True, cwd=ROOT)
    for command in ("train", "sweep", "paper", "reproduce"):
        assert re.search(rf"^\s+{command}\b", out.stdout, re.M), out.stdout
    for old in ("fdlib/training.py", "fdlib/sweeps.py", "fdlib/paper.py", "fdlib/reproduce.py"):
        assert not (ROOT / old).exists()


def readme_layout() -> dict[str, list[str]]:
    """The README's Layout section: layer -> the modules it names, from its bullets
    `- **layer** (`fdlib/layer/`): `module` (...), `module` (...)`."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    out = {}
    for bullet in re.split(r"\n(?=- \*\*)", section):
        m = re.match(r"- \*\*(\w+)\*\* \(`fdlib/(\w+)/`\): (.*)", bullet, re.S)
        if m:
            assert m.group(1) == m.group(2), bullet
            out[m.group(1)] = re.findall(r"`(\w+)`", m.group(3))
    return out


def test_readme_layout_names_every_module_in_its_layer():
    layout = readme_layout()
    assert list(layout) == list(fdlib.LAYERS), "the README lists the layers bottom up, as fdlib.LAYERS does"
    on_disk = {layer: sorted(p.stem for p in (PACKAGE / layer).glob("*.py") if p.stem != "__init__")
               for layer in fdlib.LAYERS}
    for layer, names in layout.items():
        missing = [n for n in names if not (PACKAGE / layer / f"{n}.py").exists()]
        assert not missing, f"the README's Layout puts {missing} in {layer}, which has {on_disk[layer]}"
        assert sorted(names) == on_disk[layer], f"{layer}: README lists {sorted(names)}, the folder has {on_disk[layer]}"
