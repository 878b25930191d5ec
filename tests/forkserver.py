"""Test servers forked from a warm parent, so each does not import torch again.

A server process spends about 5 s of CPU importing before it serves (torch 1.7 s, torch._dynamo 1.6 s, which
diffusers pulls in, then diffusers, transformers and the server); the suite starts about fifty. One parent per test
worker imports what reads no environment at import time (PRELOADED), then forks a child per server, which sets the
server's environment, working folder, limits and output, and runs `python -m remote_vae` (or a launcher script) as
the command line would. huggingface_hub, diffusers, transformers and remote_vae read settings from the environment
when imported, so each child imports them itself, under its own environment.

The parent reads one JSON request per line on its stdin and answers the child's pid on its stdout; it reaps its
children and writes each one's exit code (negative: the signal) to the status file the request named. EOF on stdin
(the test worker is gone) ends it and the servers it still has.
"""

from __future__ import annotations

import importlib
import json
import os
import select
import signal
import sys
import time
import traceback

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


if __name__ == "__main__":
    main()
