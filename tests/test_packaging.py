"""The installed distribution carries every package of the source tree (a wheel builds only what pyproject lists)."""
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_source_package_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    package_dir = config["package-dir"]
    found = set()
    for name, folder in package_dir.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            if "__pycache__" in rel.parts:
                continue
            dotted = ".".join((name, *rel.parts)) if rel.parts else name
            # a sub-folder mapped by its own package-dir entry belongs to that entry
            if dotted in package_dir and package_dir[dotted] != str(Path(folder) / Path(*rel.parts)):
                continue
            found.add(dotted)
    assert found - listed == set(), f"packages missing from pyproject's [tool.setuptools] packages: {sorted(found - listed)}"
