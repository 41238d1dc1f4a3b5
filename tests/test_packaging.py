"""What pip installs: the entropy library alone by default, the training stack in the `train` extra."""

import ast
import pathlib
import re
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# Import names of the distributions dibjax uses, where they differ from the distribution's name.
DISTRIBUTION = {
    "PIL": "pillow",
    "absl": "absl-py",
    "ml_collections": "ml-collections",
    "orbax": "orbax-checkpoint",
    "tensorflow_datasets": "tensorflow-datasets",
}


def declared(requirements):
    return {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower() for r in requirements}


def third_party_imports(path):
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {DISTRIBUTION.get(n, n) for n in names if n not in sys.stdlib_module_names and n != "dibjax"}


def test_the_default_install_is_the_entropy_library_alone():
    assert declared(PROJECT["dependencies"]) == {"jax", "numpy", "matfree"}
    assert third_party_imports(ROOT / "dibjax" / "entropy.py") <= {"jax", "numpy", "matfree"}
    code = (
        "import sys, dibjax, dibjax.entropy; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'flax', 'optax', 'orbax', 'tensorflow_datasets', "
        "'ml_collections', 'absl', 'matplotlib', 'tqdm', 'PIL'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_every_import_of_the_package_is_declared():
    train = declared(PROJECT["dependencies"]) | declared(PROJECT["optional-dependencies"]["train"])
    used = set().union(*(third_party_imports(p) for p in (ROOT / "dibjax").rglob("*.py")))
    assert used <= train, sorted(used - train)
    # The test-only libraries stay out of the training extra.
    assert "chex" not in train and "chex" in declared(PROJECT["optional-dependencies"]["test"])


def test_the_declared_license_ships():
    assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
