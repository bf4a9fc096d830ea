"""``pip install .`` (a wheel, not editable) ships the app, and ``llm-flow app`` serves it from any
folder. CI runs this test (``make test``); .ci/run does not repeat it.

The wheel is built from a copy of the tree (setuptools' build/ folder could carry stale modules)
without build isolation: offline, with the setuptools torch brings. It is installed with
``--no-deps`` into a fresh virtual environment, which then sees this environment's dependencies
through a ``.pth`` file (a path, so the editable llm_flow install of this environment stays
invisible), and the server is started from an empty folder with no ``PYTHONPATH``. ~20-40 s on
2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.models.conftest import TINY_SHAPE

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 60
_NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "test-artifacts"
)
# What an installed llm_flow must find (printed as JSON by the fresh environment).
PROBE = """
import importlib.util, json
import llm_flow, llm_flow.resources as r
from llm_flow.config import default_config
from llm_flow.models.random import shape_names
cfg = default_config()
print(json.dumps({
    "llm_flow": llm_flow.__file__,
    "root": str(r.root()),
    "app_script": r.app_script().is_file(),
    "shapes": list(shape_names()),
    "prompts_dir": str(cfg.prompts_dir),
    "preloaded": cfg.preloaded_dataset_filename.is_file(),
    "top_level_app": importlib.util.find_spec("app") is not None,
}))
"""


def _clean_env() -> dict[str, str]:
    """No PYTHONPATH: neither pip nor the fresh environment may see the checkout."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LLM_FLOW_CONFIG")}


def _run(*argv: str | Path, cwd: Path | None = None) -> str:
    done = subprocess.run(
        [str(a) for a in argv],
        cwd=cwd,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    shutil.copytree(REPO, work / "src", ignore=_NOT_SOURCES)
    _run(
        sys.executable,
        *("-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"),
        *(work / "src", "-w", work / "dist"),
    )
    (path,) = (work / "dist").glob("llm_flow-*.whl")
    return path


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh environment with the wheel installed (its bin/ folder)."""
    prefix = tmp_path_factory.mktemp("venv")
    _run(sys.executable, "-m", "venv", "--without-pip", prefix)
    python = prefix / "bin" / "python"
    _run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel)
    # After the install, so pip never sees (or touches) this environment's packages.
    purelib = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    deps = sysconfig.get_paths()["purelib"]
    (Path(purelib.strip()) / "llm_flow_test_deps.pth").write_text(deps + "\n", encoding="utf-8")
    return prefix / "bin"


def test_the_wheel_holds_the_app_configs_shapes_and_prompts(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    bundle = "llm_flow/bundle/"
    expected = {
        f"{bundle}{path.relative_to(REPO).as_posix()}"
        for folder in ("app", "config", "sample_inputs", ".streamlit")
        for path in (REPO / folder).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert {f"{bundle}app/main.py", f"{bundle}config/shapes/Llama-3.1-8B.json"} <= expected
    assert expected <= names, sorted(expected - names)
    assert not any(n.startswith(("app/", "config/", "tests/", "docs/")) for n in names)
    assert not any(n.startswith(bundle) and n.count("/") == 2 and n.endswith(".py") for n in names)


def test_the_installed_package_finds_its_files(venv: Path, tmp_path: Path) -> None:
    found = json.loads(_run(venv / "python", "-c", PROBE, cwd=tmp_path))
    root = Path(found["root"])
    assert Path(found["llm_flow"]).is_relative_to(venv.parent)  # the wheel, not the checkout
    assert root == Path(found["llm_flow"]).parent / "bundle"
    assert found["app_script"] and found["preloaded"]
    assert found["shapes"] == sorted(p.stem for p in (REPO / "config" / "shapes").glob("*.json"))
    assert found["prompts_dir"] == str(root / "sample_inputs")
    assert not found["top_level_app"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def server(venv: Path, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """``llm-flow app`` started from an empty folder: (port, its log file)."""
    port = _free_port()
    log = tmp_path / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [venv / "llm-flow", "app", "--server.headless", "true", "--server.port", str(port)],
            cwd=tmp_path,
            env=_clean_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield port, log
    finally:
        process.terminate()  # the launcher exec'd streamlit: this stops the server itself
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode("utf-8"))
    except OSError:
        return None


def test_llm_flow_app_serves_from_any_folder(server: tuple[int, Path]) -> None:
    port, log = server
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT
    health = None
    while health is None and time.monotonic() < deadline:
        time.sleep(0.5)
        health = _get(f"{base}/_stcore/health")
    assert health == "ok", log.read_text()
    page = _get(base) or ""
    assert "<html" in page.lower()


# The installed app itself, run once by Streamlit's AppTest in the fresh environment on a tiny
# random-weight model: the bundled script imports the bundled ``app`` package.
APP_RUN = """
import json
from streamlit.testing.v1 import AppTest
import llm_flow.resources as r
at = AppTest.from_file(str(r.app_script()), default_timeout=120)
at.query_params["prompt"] = "Hello"
at.run()
print(json.dumps({
    "script": at._script_path,
    "exceptions": [e.value for e in at.exception],
    "errors": [e.value for e in at.error],
    "captions": [c.value for c in at.caption],
}))
"""


def test_the_installed_app_draws_a_route(venv: Path, tmp_path: Path) -> None:
    shape = tmp_path / "tiny.json"
    shape.write_text(json.dumps(TINY_SHAPE), encoding="utf-8")
    config = tmp_path / "tiny-config.json"
    model = {"source": "random", "shape": str(shape)}
    config.write_text(json.dumps({"models": {"tiny": model}, "default_model": "tiny"}))
    done = subprocess.run(
        [venv / "python", "-c", APP_RUN],
        cwd=tmp_path,
        env={**_clean_env(), "LLM_FLOW_CONFIG": str(config), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    page = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(page["script"]).is_relative_to(venv.parent)
    assert page["exceptions"] == [] and page["errors"] == []
    assert any(c.startswith("Route:") for c in page["captions"]), page
