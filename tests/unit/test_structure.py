"""The shape of the code, checked: no import cycle, a torch-free settings stage, entry points that import neither
diffusers' architecture code nor Ray, small modules and functions.

These read the source (ast); what imports what at run time is asked of fresh interpreters.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "remote_vae"
MAX_MODULE_LINES = 420  # about 400: a module past it is two
MAX_FUNCTION_LINES = 50  # past it, a `# long: why` comment in the comments right above the def says why


def modules() -> dict[str, Path]:
    found = {"handler": ROOT / "handler.py"}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The project's modules that `name` imports anywhere in its file, lazily inside functions or not."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            # `from package import module` needs the module, not all of the package; anything else needs `base`.
            modules_named = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known]
            targets = modules_named if len(modules_named) == len(node.names) else [base, *modules_named]
        else:
            continue
        found |= {target for target in targets if target in known and target != name}
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_itself_back():
    known = modules()
    graph = {name: imported(name, path, set(known)) for name, path in known.items()}
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_settings_and_the_command_line_import_no_torch():
    # `serve` with a family it does not know, or --model ambiguous, fails (exit 2) before torch is imported
    code = (
        "import sys; import remote_vae.settings, remote_vae.cli; remote_vae.settings.read_settings(['sd15']); "
        "remote_vae.cli.build_parser(); "
        "codes = [remote_vae.cli.main(['serve', *args]) for args in (['nope'], ['sd15', 'flux', '--model', 'x'])]; "
        "print(codes, sorted(m for m in ('torch', 'diffusers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.strip() == "[2, 2] []", result.stdout + result.stderr


@pytest.fixture(scope="module")
def entry_point_imports() -> set[str]:
    """What importing the server, the launcher, the command line, the client and handler.py loads (one process)."""
    code = (
        "import sys, remote_vae.server, remote_vae.launch, remote_vae.cli, remote_vae.client, handler; "
        "print(' '.join(sorted(sys.modules)))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def test_the_entry_points_import_no_architecture_code(entry_point_imports):
    """diffusers' architecture modules and the tilers that reach into them are imported when a model is loaded, so a
    diffusers that lacks or renamed one of them costs that family, not every import."""
    prefixes = ("diffusers.models.autoencoders.", "remote_vae.tiling.")
    assert sorted(name for name in entry_point_imports if name.startswith(prefixes)) == []


def test_the_single_server_imports_no_ray(entry_point_imports):
    """Ray Serve is an extra: the server, the client and handler.py run without it (ray_serve.py alone imports it)."""
    assert "ray" not in entry_point_imports and "remote_vae.ray_serve" not in entry_point_imports


@pytest.mark.parametrize("name", sorted(modules()))
def test_modules_and_functions_stay_small(name):
    path = modules()[name]
    lines = path.read_text().splitlines()
    assert len(lines) <= MAX_MODULE_LINES, f"{path}: {len(lines)} lines; split it by responsibility"
    long = []
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno] + [decorator.lineno for decorator in node.decorator_list])
            size = node.end_lineno - node.lineno + 1
            if size > MAX_FUNCTION_LINES and not _says_why(lines, first - 1):
                long.append(f"{node.name} ({size} lines)")
    assert not long, f"{path}: {', '.join(long)}: split, or say why above the def (# long: ...)"


def _says_why(lines: list[str], index: int) -> bool:
    """Whether the comment block right above lines[index] holds a `# long:` reason."""
    while index > 0 and lines[index - 1].strip().startswith("#"):
        index -= 1
        if lines[index].strip().startswith("# long:"):
            return True
    return False


def test_every_package_is_installed():
    """pyproject.toml lists the packages by name: a new one left out would be missing from the wheel."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(path.parent.relative_to(ROOT).parts) for path in PACKAGE.rglob("__init__.py")}
    assert found | {"remote_vae.configs"} == listed
