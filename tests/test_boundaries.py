"""Package boundaries: model/ imports only torch (and the stdlib); dependencies point one way.

model → data → pipeline → deploy → benchmarks; no installed package imports tests/.
"""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "model": {
        "data",
        "pipeline",
        "deploy",
        "ray",
        "deepspeed",
        "mlflow",
        "webdataset",
        "s3fs",
        "numpy",
        "av",
        "fastapi",
        "benchmarks",
        "tests",
    },
    "data": {"pipeline", "deploy", "benchmarks", "tests"},
    "pipeline": {"deploy", "benchmarks", "tests"},
    "deploy": {"benchmarks", "tests"},  # benchmarks is the top layer: only the CLI registers it
    # tests/ is not installed: an import of it breaks the `omniforcing` console script.
    "benchmarks": {"tests"},
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_dependency_direction():
    problems = []
    for package, forbidden in FORBIDDEN.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            if package == "pipeline" and path.name == "cli.py":
                continue  # the composition root registers every package's commands
            bad = _imports(path) & forbidden
            if bad:
                problems.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not problems, problems


def test_model_third_party_imports_are_only_torch_and_safetensors():
    stdlib = set(sys.stdlib_module_names)
    allowed = {"torch", "model", "safetensors"}
    extra = set()
    for path in (ROOT / "model").rglob("*.py"):
        extra |= {n for n in _imports(path) if n not in stdlib and n not in allowed}
    assert not extra, extra
