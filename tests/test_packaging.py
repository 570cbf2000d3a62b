"""Distributions: the bridge client installs alone, with pyzmq and msgpack as its only dependencies."""
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bridge_builds_and_imports_alone(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(REPO / "bridge", source, ignore=shutil.ignore_patterns("c", "cpp", "unity", "build", "*.egg-info",
                                                                          "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source),
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("npc_bridge-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        modules = {n for n in z.namelist() if n.endswith(".py")}
        metadata = z.read(next(n for n in z.namelist() if n.endswith("METADATA"))).decode()
        z.extractall(tmp_path / "site")
    assert modules == {"bridge/__init__.py", "bridge/client.py", "bridge/protocol.py", "bridge/scene_memory_calls.py"}
    requires = sorted(line.split(":", 1)[1].split(">")[0].strip() for line in metadata.splitlines()
                      if line.startswith("Requires-Dist:"))
    assert requires == ["msgpack", "pyzmq"]
    site = tmp_path / "site"
    probe = (f"import sys; sys.path.insert(0, {str(site)!r}); import bridge; "
             "print(bridge.__file__); print(sorted(m for m in ('npc_engine', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                         check=True, timeout=60).stdout.splitlines()
    assert out == [str(site / "bridge" / "__init__.py"), "[]"]


def test_gpu_only_dependencies_are_an_extra():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"])
    assert "onnxruntime" not in base and "triton" not in base
    extras = project["optional-dependencies"]
    assert any(d.startswith("onnxruntime-gpu") for d in extras["gpu"])
    assert extras["cpu"] == ["onnxruntime>=1.18"]
    assert project["name"] != "npc-engine"  # taken on the package registry by an unrelated project
