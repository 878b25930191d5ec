"""Servers forked from a warm parent, so each does not import torch again: the test suite's and the GPU suite's.

A server process spends about 5 s of CPU importing before it serves (torch 1.7 s, torch._dynamo 1.6 s, which
diffusers pulls in, then diffusers, transformers and the server); the test suite starts about fifty, the GPU suite
eight. One parent per test worker (or suite) imports what reads no environment at import time (PRELOADED), then forks
a child per server, which sets the server's environment, working folder, limits and output, and runs
`python -m remote_vae` (or a launcher script) as the command line would. The parent never touches CUDA, so a child
may. huggingface_hub, diffusers, transformers and remote_vae read settings from the environment when imported, so
each child imports them itself, under its own environment. `ServerForker` is the caller's side; run as a script, this
file is the parent.

The parent reads one JSON request per line on its stdin and answers the child's pid on its stdout; it reaps its
children and writes each one's exit code (negative: the signal) to the status file the request named. EOF on stdin
(the test worker is gone) ends it and the servers it still has.
"""

from __future__ import annotations

import importlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

# Nothing here may read the environment a server is given: the children inherit these modules as they are.
PRELOADED = (
    "torch",
    "torch._dynamo",
    "numpy",
    "PIL.Image",
    "safetensors.torch",
    "starlette.applications",
    "uvicorn",
    "prometheus_client",
    "imageio_ffmpeg",
    "requests",
)
ENVIRONMENT_READERS = ("huggingface_hub", "diffusers", "transformers", "accelerate", "remote_vae")
REAP_SECONDS = 0.05


def preload() -> None:
    for name in PRELOADED:
        try:
            importlib.import_module(name)
        except ImportError:  # an older stack may lack one: its children import what they use
            pass
    early = sorted({name.split(".")[0] for name in sys.modules} & set(ENVIRONMENT_READERS))
    if early:
        raise SystemExit(f"forkserver: {early} imported before the fork; they read the environment when imported")


def run_child(request: dict) -> None:
    """In the forked child: become the server the request describes; never returns."""
    code = 1
    try:
        log = os.open(request["log"], os.O_WRONLY | os.O_APPEND)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.close(null)
        if request.get("open_files"):
            import resource

            resource.setrlimit(resource.RLIMIT_NOFILE, (request["open_files"], request["open_files"]))
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        import torch

        # OpenMP read OMP_NUM_THREADS when torch loaded, in the parent: the child's own value is set here.
        if threads := os.environ.get("OMP_NUM_THREADS"):
            torch.set_num_threads(int(threads))
        import runpy

        sys.argv = [request["script"] or "remote_vae", *request["args"]]
        if request["script"]:
            runpy.run_path(request["script"], run_name="__main__")
        else:
            runpy.run_module("remote_vae", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exit:
        if exit.code is None or isinstance(exit.code, int):
            code = exit.code or 0
        else:
            print(exit.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def reap(status_files: dict[int, str]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if path := status_files.pop(pid, None):
            with open(path + ".part", "w") as out:
                out.write(str(os.waitstatus_to_exitcode(status)))
            os.replace(path + ".part", path)


def end_children(status_files: dict[int, str]) -> None:
    for pid in status_files:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while status_files and time.monotonic() < deadline:
        reap(status_files)
        time.sleep(REAP_SECONDS)
    for pid in status_files:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def main() -> None:
    preload()
    status_files: dict[int, str] = {}
    pending = b""
    os.write(1, b'{"ready": true}\n')
    while True:
        readable, _, _ = select.select([0], [], [], REAP_SECONDS)
        reap(status_files)
        if not readable:
            continue
        chunk = os.read(0, 1 << 16)
        if not chunk:
            break
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            if not line.strip():
                continue
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                run_child(request)
            status_files[pid] = request["status"]
            os.write(1, json.dumps({"pid": pid}).encode() + b"\n")
    end_children(status_files)


class ForkedServer:
    """A server process forked by the parent, with the part of subprocess.Popen's interface its callers use."""

    def __init__(self, pid: int, status: Path, command: list[str]):
        self.pid, self.status, self.args = pid, status, command
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and self.status.exists():
            self.returncode = int(self.status.read_text())
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.02)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ServerForker:
    """The caller's side: the parent started (in `cwd`, with `environment()`) at the first server; None from start()
    where it cannot run, and then the caller starts servers as commands. REMOTE_VAE_TEST_FORK=0 turns it off."""

    def __init__(self, cwd: Path, environment: Callable[[], dict[str, str]]):
        self.cwd, self.environment = cwd, environment
        self.parent: subprocess.Popen | None = None
        self.folder: Path | None = None
        self.wanted = sys.platform == "linux" and os.environ.get("REMOTE_VAE_TEST_FORK", "1") != "0"
        self.usable = self.wanted  # until the parent fails to start
        self.count = 0
        self.lock = threading.Lock()

    def _launch(self) -> bool:
        self.folder = Path(tempfile.mkdtemp(prefix="remote-vae-forkserver-"))
        with open(self.folder / "forkserver.log", "wb") as log:
            self.parent = subprocess.Popen(
                [sys.executable, "-u", __file__],
                cwd=self.cwd,
                env=self.environment(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        if json.loads(self.parent.stdout.readline() or "{}").get("ready") is not True:
            self.usable = False  # servers start as commands, as they would without it
            print(f"forkserver: {(self.folder / 'forkserver.log').read_text()[-2000:]}", file=sys.stderr)
        return self.usable

    def start(self, command: list[str], env: dict[str, str], log_path: Path, open_files: int | None = None):
        """`command` (sys.executable, then -m remote_vae or a script, then its arguments) as a forked child."""
        if command[1] == "-m" and command[2] == "remote_vae":
            script, args = None, command[3:]
        elif command[1].endswith(".py"):
            script, args = command[1], command[2:]
        else:
            return None
        with self.lock:
            if not self.usable:
                return None
            if (self.parent is None or self.parent.poll() is not None) and not self._launch():
                return None
            self.count += 1
            status = self.folder / f"{self.count}.status"
            request = dict(
                script=script, args=args, env=env, cwd=str(self.cwd), log=str(log_path), status=str(status),
                open_files=open_files,
            )  # fmt: skip
            self.parent.stdin.write(json.dumps(request).encode() + b"\n")
            self.parent.stdin.flush()
            return ForkedServer(json.loads(self.parent.stdout.readline())["pid"], status, command)

    def close(self) -> None:
        if self.parent is not None:
            self.parent.stdin.close()
            try:
                self.parent.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.parent.kill()
            shutil.rmtree(self.folder, ignore_errors=True)


if __name__ == "__main__":
    main()
