"""pyproject.toml lists the wheel's packages by hand (the bundled app is a mapped folder, which
setuptools cannot find): every package of the tree must be listed, and every bundled file must
match a package-data pattern. tests/integration/test_wheel.py builds and installs the wheel."""

from __future__ import annotations

import tomllib
from pathlib import Path, PurePosixPath

from llm_flow import resources

REPO = Path(__file__).resolve().parents[2]
SETUPTOOLS = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"][
    "setuptools"
]
BUNDLE = "llm_flow.bundle"


def _packages(folder: str, prefix: str) -> set[str]:
    return {
        prefix + ".".join(init.parent.relative_to(REPO).parts)
        for init in (REPO / folder).rglob("__init__.py")
    }


def test_every_package_of_the_tree_is_in_the_wheel() -> None:
    expected = _packages("llm_flow", "") | _packages("app", f"{BUNDLE}.") | {BUNDLE}
    assert set(SETUPTOOLS["packages"]) == expected
    assert SETUPTOOLS["package-dir"] == {BUNDLE: "."}  # the bundle is laid out as the repository


def test_every_bundled_data_file_matches_a_pattern() -> None:
    patterns = SETUPTOOLS["package-data"][BUNDLE]
    data = [
        PurePosixPath(path.relative_to(REPO).as_posix())
        for folder in ("config", "sample_inputs", ".streamlit", "app")
        for path in (REPO / folder).rglob("*")
        # the app's own files besides its modules (the graph component's script)
        if path.is_file() and path.suffix not in (".py", ".pyc")
    ]
    assert data
    unmatched = [str(p) for p in data if not any(p.match(pattern) for pattern in patterns)]
    assert unmatched == []


def test_a_checkout_finds_its_own_files() -> None:
    assert not resources.BUNDLE.exists()  # only a wheel has llm_flow/bundle
    assert resources.root() == REPO
    assert resources.app_script() == REPO / "app" / "main.py"
    assert resources.default_config_file().is_file()
    assert (resources.shapes_dir() / "Llama-3.1-8B.json").is_file()
    assert (resources.sample_inputs_dir() / "bench_text.txt").is_file()
    assert resources.streamlit_config().is_file()
