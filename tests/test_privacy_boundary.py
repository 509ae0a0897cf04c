"""fedge.privacy works alone: it imports nothing else of fedge (DESIGN's boundary)."""

import ast
import subprocess
import sys
from pathlib import Path

PRIVACY = Path(__file__).resolve().parents[1] / "fedge" / "privacy"


def test_privacy_sources_import_only_privacy():
    """Every import statement, lazy ones inside functions included."""
    outside = []
    for path in sorted(PRIVACY.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):  # a relative one resolved from its package
                package = ["fedge", *path.relative_to(PRIVACY.parent).parent.parts]
                base = package[: len(package) - node.level + 1] if node.level else []
                names = [".".join([*base, *([node.module] if node.module else [])])]
            else:
                continue
            for name in names:
                if name.split(".")[0] == "fedge" and not name.startswith("fedge.privacy"):
                    outside.append(f"{path.relative_to(PRIVACY)}:{node.lineno} {name}")
    assert outside == []
    assert len(list(PRIVACY.rglob("*.py"))) >= 14  # the walk saw the packages


def test_importing_privacy_loads_no_other_fedge_module():
    code = (
        "import sys\n"
        "import fedge.privacy.codesign, fedge.privacy.service\n"
        "print(sorted(m for m in sys.modules if m.startswith('fedge.') "
        "and not m.startswith('fedge.privacy')))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"
