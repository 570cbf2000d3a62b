"""Starting and stopping an npc-engine service for the demo when none is given with --connect."""
import os
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServiceProcess:
    address: str
    process: subprocess.Popen
    log_path: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout_s: float = 10.0) -> int:
        """SIGINT first (the service answers what is in flight and exits), then SIGKILL."""
        if self.alive():
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_service(personas: Path, model: str | None = None, draft: str | None = None,
                  device: str | None = None, threads: int | None = None) -> ServiceProcess:
    """`python -m npc_engine serve` on a free loopback port; its output goes to a log file.
    `threads` caps the service's CPU threads, so a CPU model leaves cores to the game."""
    address = f"tcp://127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "npc_engine", "serve", "--bind", address,
               "--personas", str(personas)]
    for flag, value in (("--model", model), ("--draft", draft), ("--device", device)):
        if value is not None:
            command += [flag, str(value)]
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    log = tempfile.NamedTemporaryFile(prefix="npc-engine-serve-", suffix=".log", delete=False)
    with log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                   env=env, stdin=subprocess.DEVNULL)
    return ServiceProcess(address, process, Path(log.name))
