"""model_server reaches the energy package only through its public API (``edge_proxy.energy.__all__``).

Reads every ``model_server`` module's imports (AST, nothing imported) and checks that imports of
``edge_proxy.energy`` name the package itself and only names it exports; and that every exported
name exists (importing the package)."""
from __future__ import annotations

import ast
from pathlib import Path

import edge_proxy.energy as energy

ROOT = Path(__file__).resolve().parents[1] / "model_server"


def _energy_imports() -> list[tuple[str, int, str, list[str]]]:
    """(file, line, module, names) for each import of edge_proxy.energy[.*] in model_server."""
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edge_proxy.energy"):
                found.append((path.name, node.lineno, node.module, [a.name for a in node.names]))
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("edge_proxy.energy"):
                        found.append((path.name, node.lineno, a.name, []))
    return found


def test_model_server_imports_only_the_public_energy_api():
    imports = _energy_imports()
    assert imports, "model_server's /energy route imports the energy sampler: the scan found nothing"
    for file, line, module, names in imports:
        assert module == "edge_proxy.energy", f"{file}:{line} imports the private module {module}"
        private = [n for n in names if n not in energy.__all__]
        assert not private, f"{file}:{line} imports {private}, not in edge_proxy.energy.__all__"


def test_public_energy_api_names_exist():
    for name in energy.__all__:
        assert getattr(energy, name, None) is not None, name
    assert {"Sampler", "NvmlReader"} <= set(energy.__all__)
