"""scripts/deploy_endpoint.py against a fake Inference Endpoints API on 127.0.0.1.

huggingface_hub reads the API base from constants.INFERENCE_ENDPOINTS_ENDPOINT on each call;
the tests point it at FakeEndpointsApi and assert the JSON the script sends. The fake endpoint's
URL is a real remote-vae server, so waiting (which polls the health route) and the printed
diffusers code are exercised for real. Nothing reaches the Hub.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from conftest import ROOT, LiveServer, offline_env, seeded
from diffusers_reference import SD, assert_pixels_close, decode_locally, uint8_locally
from huggingface_hub import constants

pytestmark = [pytest.mark.deployment]

spec = importlib.util.spec_from_file_location("deploy_endpoint", ROOT / "scripts" / "deploy_endpoint.py")
deploy_endpoint = importlib.util.module_from_spec(spec)
spec.loader.exec_module(deploy_endpoint)

NAMESPACE = "remote-vae-tests"
IMAGE = "ghcr.io/remote-vae/remote-vae:test"


class FakeEndpointsApi:
    """The few routes of api.endpoints.huggingface.cloud/v2 that the script uses, with endpoint state.

    A created or updated endpoint reports `pending`, then `initializing`, then `running` at
    `endpoint_url` on the following GETs, or `failed` when `fail` is set.
    """

    def __init__(self, endpoint_url: str):
        self.endpoint_url = endpoint_url
        self.requests: list[tuple[str, str, dict | None]] = []
        self.endpoints: dict[str, dict] = {}
        self.fail = False
        api = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                api.requests.append((self.command, self.path, body))
                status, reply = api.route(self.command, self.path, body)
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = _answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_port}/v2"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def route(self, method: str, path: str, body: dict | None) -> tuple[int, dict]:
        parts = path.strip("/").split("/")  # v2 endpoint NAMESPACE [NAME]
        if parts[:2] != ["v2", "endpoint"] or len(parts) not in (3, 4) or parts[2] != NAMESPACE:
            return 404, {"error": f"no route {method} {path}"}
        if method == "POST" and len(parts) == 3:
            self.endpoints[body["name"]] = {"raw": body, "polls": 0}
            return 200, self.view(body["name"])
        name = parts[3]
        if name not in self.endpoints:
            return 404, {"error": f"endpoint {name} not found"}
        endpoint = self.endpoints[name]
        if method == "PUT":
            for section, fields in body.items():
                endpoint["raw"].setdefault(section, {}).update(fields)
            endpoint["polls"] = 0
        else:
            endpoint["polls"] += 1
        return 200, self.view(name)

    def view(self, name: str) -> dict:
        endpoint = self.endpoints[name]
        raw = json.loads(json.dumps(endpoint["raw"]))
        states = ["pending", "initializing", "failed" if self.fail else "running"]
        state = states[min(endpoint["polls"], 2)]
        raw["model"].setdefault("revision", None)
        raw["model"].setdefault("task", None)
        raw["status"] = {
            "state": state,
            "createdAt": "2026-11-22T10:00:00Z",
            "updatedAt": "2026-11-22T10:00:00Z",
            "url": self.endpoint_url if state == "running" else None,
        }
        raw["healthRoute"] = raw["model"]["image"].get("custom", {}).get("healthRoute", "/health")
        return raw

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def keyed_server(model_dirs, tmp_path_factory):
    """What the endpoint would run: sd15 behind an API key."""
    env = offline_env(REMOTE_VAE_API_KEY="k" * 32)
    server = LiveServer(
        ["sd15", "--model", str(model_dirs["sd15"])], env, tmp_path_factory.mktemp("logs") / "endpoint.log"
    )
    yield server
    server.stop()


@pytest.fixture
def fake_api(keyed_server, monkeypatch):
    api = FakeEndpointsApi(keyed_server.url)
    monkeypatch.setattr(constants, "INFERENCE_ENDPOINTS_ENDPOINT", api.base)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_real")
    yield api
    api.close()


def deploy(*extra: str) -> list[str]:
    return [
        "deploy",
        "vae-sd15",
        "--namespace",
        NAMESPACE,
        "--family",
        "sd15",
        "--poll-seconds",
        "0.05",
        "--timeout",
        "30",
        *extra,
    ]


def expected_create(**changes) -> dict:
    body = {
        "compute": {
            "accelerator": "gpu",
            "instanceSize": "x1",
            "instanceType": "nvidia-l4",
            "scaling": {"maxReplica": 1, "minReplica": 1, "scaleToZeroTimeout": None},
        },
        "model": {
            "framework": "custom",
            "repository": "stabilityai/sd-vae-ft-mse",
            "revision": None,
            "image": {"custom": {"url": IMAGE, "port": 8000, "healthRoute": "/health"}},
            "task": "custom",
            "env": {"REMOTE_VAE_FAMILIES": "sd15"},
        },
        "name": "vae-sd15",
        "provider": {"region": "us-east-1", "vendor": "aws"},
        "type": "authenticated",
    }
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = body
        for key in parents:
            node = node[key]
        node[leaf] = value
    return body


def printed_code(output: str) -> str:
    return output[output.index("# --- diffusers ---") : output.index("# --- end ---")]


def test_dry_run_prints_the_exact_request_and_sends_nothing(fake_api, capsys, monkeypatch):
    monkeypatch.setenv("MY_VAE_KEY", "s" * 40)
    argv = deploy(
        "--image",
        IMAGE,
        "--api-key-env",
        "MY_VAE_KEY",
        "--scale-to-zero-minutes",
        "30",
        "--max-replicas",
        "3",
        "--env",
        "REMOTE_VAE_MAX_BATCH=8",
        "--instance-type",
        "nvidia-l40s",
        "--region",
        "eu-west-1",
        "--dry-run",
    )
    assert deploy_endpoint.main(argv) == 0
    request = json.loads(capsys.readouterr().out)
    assert fake_api.requests == []
    assert request["method"] == "POST"
    assert request["url"] == f"{fake_api.base}/endpoint/{NAMESPACE}"  # the API base in effect: here, the fake's
    assert request["json"] == expected_create(
        compute__instanceType="nvidia-l40s",
        compute__scaling={"maxReplica": 3, "minReplica": 0, "scaleToZeroTimeout": 30},
        model__env={"REMOTE_VAE_FAMILIES": "sd15", "REMOTE_VAE_MAX_BATCH": "8"},
        model__secrets={"REMOTE_VAE_API_KEY": "<redacted>"},
        provider__region="eu-west-1",
        type="public",
    )
    assert "s" * 40 not in json.dumps(request)


def test_deploy_creates_waits_and_prints_diffusers_code_that_works(fake_api, capsys, monkeypatch, reference):
    monkeypatch.setenv("MY_VAE_KEY", "k" * 32)
    assert deploy_endpoint.main(deploy("--image", IMAGE, "--api-key-env", "MY_VAE_KEY")) == 0
    out = capsys.readouterr().out
    method, path, body = fake_api.requests[0]
    assert (method, path) == ("GET", f"/v2/endpoint/{NAMESPACE}/vae-sd15")  # does it exist?
    method, path, body = fake_api.requests[1]
    assert (method, path) == ("POST", f"/v2/endpoint/{NAMESPACE}")
    assert body == expected_create(model__secrets={"REMOTE_VAE_API_KEY": "k" * 32}, type="public")
    assert [m for m, _, _ in fake_api.requests[2:]] == ["GET", "GET"]  # polled until running
    assert f"endpoint ready: {fake_api.endpoint_url}" in out

    # The printed code, run as a user would paste it, decodes through the endpoint's server.
    monkeypatch.setenv("REMOTE_VAE_API_KEY", "k" * 32)
    code = printed_code(out).replace('image.save("sd15.png")', "")
    from diffusers.utils import remote_utils

    monkeypatch.setattr(remote_utils, "requests", remote_utils.requests)  # the code swaps in a session; undo after
    namespace = {}
    exec(code, namespace)
    image = namespace["image"]
    expected = uint8_locally(decode_locally(reference["sd15"], namespace["latents"], SD))[0]
    assert image.size == (64, 64)
    assert_pixels_close(np.asarray(image.convert("RGB")), expected)


def test_second_deploy_updates_the_endpoint(fake_api, capsys, monkeypatch):
    assert deploy_endpoint.main(deploy("--image", IMAGE, "--no-wait")) == 0
    monkeypatch.setenv("REGISTRY_TOKEN", "ghp_not_real")
    update = (
        "--image",
        IMAGE + "2",
        "--max-replicas",
        "4",
        "--env",
        "REMOTE_VAE_MAX_QUEUE=8",
        "--no-wait",
        "--registry-username",
        "me",
        "--registry-password-env",
        "REGISTRY_TOKEN",
    )
    assert deploy_endpoint.main(deploy(*update)) == 0
    assert "updated endpoint" in capsys.readouterr().out
    method, path, body = fake_api.requests[-1]
    assert (method, path) == ("PUT", f"/v2/endpoint/{NAMESPACE}/vae-sd15")
    assert body == {
        "compute": {
            "accelerator": "gpu",
            "instanceSize": "x1",
            "instanceType": "nvidia-l4",
            "scaling": {"maxReplica": 4, "minReplica": 1},
        },
        "model": {
            "repository": "stabilityai/sd-vae-ft-mse",
            "framework": "custom",
            "task": "custom",
            "image": {
                "custom": {
                    "url": IMAGE + "2",
                    "port": 8000,
                    "healthRoute": "/health",
                    "credentials": {"username": "me", "password": "ghp_not_real"},
                }
            },
            "env": {"REMOTE_VAE_FAMILIES": "sd15", "REMOTE_VAE_MAX_QUEUE": "8"},
        },
    }
    # A dry run shows the credentials' user, never the password.
    assert deploy_endpoint.main(deploy(*update, "--dry-run")) == 0
    shown = capsys.readouterr().out
    assert '"username": "me"' in shown and "ghp_not_real" not in shown


def test_several_families_and_the_handler_mode(fake_api, capsys):
    argv = [
        "deploy",
        "vae-all",
        "--namespace",
        NAMESPACE,
        "--family",
        "sd15",
        "--family",
        "flux",
        "--image",
        IMAGE,
        "--repository",
        "me/weights",
        "--dry-run",
    ]
    assert deploy_endpoint.main(argv) == 0
    body = json.loads(capsys.readouterr().out)["json"]
    assert body["model"]["env"] == {"REMOTE_VAE_FAMILIES": "sd15 flux"}
    assert body["model"]["repository"] == "me/weights"

    argv = deploy("--handler", "--repository", "me/vae-sd15-endpoint", "--dry-run")
    assert deploy_endpoint.main(argv) == 0
    body = json.loads(capsys.readouterr().out)["json"]
    assert body == expected_create(model__image={"huggingface": {}}, model__repository="me/vae-sd15-endpoint")


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--family", "flux", "--image", IMAGE],
            "pass --repository",
        ),  # flux's VAE is a subfolder of a 30 GB repository
        (["--family", "sd15", "--handler"], "--handler needs --repository"),
        (
            ["--family", "sd15", "--handler", "--repository", "me/x", "--generate-api-key"],
            "does not check remote-vae API keys",
        ),
        (["--family", "sd15", "--image", IMAGE, "--generate-api-key", "--type", "authenticated"], "use --type public"),
        (["--family", "sd15", "--image", IMAGE, "--api-key-env", "NO_SUCH_VARIABLE_SET"], "is not set"),
        (
            ["--family", "sd15", "--image", IMAGE, "--api-key-env", "SHORT_KEY"],
            "at least 16 printable characters",
        ),  # the server would refuse it
        (["--family", "sd15", "--image", IMAGE, "--env", "NOEQUALS"], "expected NAME=VALUE"),
        (["--family", "nope", "--image", IMAGE], "nope"),
    ],
)
def test_settings_that_cannot_work_exit_2_before_any_request(fake_api, capsys, monkeypatch, extra, message):
    monkeypatch.setenv("SHORT_KEY", "tooshort")
    assert deploy_endpoint.main(["deploy", "x", "--namespace", NAMESPACE, *extra]) == 2
    assert message in capsys.readouterr().err
    assert fake_api.requests == []


def test_a_failed_deployment_exits_1(fake_api, capsys):
    fake_api.fail = True
    assert deploy_endpoint.main(deploy("--image", IMAGE)) == 1
    assert "failed" in capsys.readouterr().err


def test_prepare_repo_refuses_a_family_newer_than_the_toolkits_diffusers(model_dirs, tmp_path, capsys):
    config = json.loads((ROOT / "configs" / "sd15.json").read_text()) | {"name": "future", "min_diffusers": "99.0"}
    (tmp_path / "future.json").write_text(json.dumps(config))
    assert (
        deploy_endpoint.main(
            [
                "prepare-repo",
                str(tmp_path / "repo"),
                "--family",
                str(tmp_path / "future.json"),
                "--model",
                str(model_dirs["sd15"]),
            ]
        )
        == 2
    )
    assert (
        f"future needs diffusers >= 99.0; the stock toolkit runs {deploy_endpoint.toolkit_diffusers()}"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "repo").exists()


def test_prepared_repository_runs_under_the_toolkit_loader(model_dirs, reference, tmp_path, capsys):
    """prepare-repo, then load its handler.py as huggingface-inference-toolkit does, from a clean process."""
    repo = tmp_path / "vae-sd15-endpoint"
    assert (
        deploy_endpoint.main(["prepare-repo", str(repo), "--family", "sd15", "--model", str(model_dirs["sd15"])]) == 0
    )
    assert sorted(path.name for path in repo.iterdir()) == [
        "README.md",
        "config.json",
        "configs",
        "diffusion_pytorch_model.safetensors",
        "handler.py",
        "remote_vae",
        "requirements.txt",
    ]
    assert (repo / "requirements.txt").read_text() == deploy_endpoint.TOOLKIT_REQUIREMENTS.read_text()
    requirements = {
        re.split(r"[=<>]", line)[0].lower(): line
        for line in (repo / "requirements.txt").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert requirements["diffusers"] == f"diffusers=={deploy_endpoint.toolkit_diffusers()}"
    assert not {"torch", "transformers", "starlette", "uvicorn", "sentence-transformers"} & set(
        requirements
    )  # the toolkit image's stay
    assert requirements["huggingface_hub"].endswith(",<1.0")  # transformers 4.x needs it below 1.0
    assert (
        deploy_endpoint.main(["prepare-repo", str(repo), "--family", "sd15", "--model", str(model_dirs["sd15"])]) == 2
    )

    latents = seeded(1, 4, 8, 8)
    request = {
        "inputs": base64.b64encode(latents.numpy().tobytes()).decode(),
        "parameters": {
            "shape": [1, 4, 8, 8],
            "dtype": "float32",
            "scaling_factor": SD,
            "output_type": "pt",
            "partial_postprocess": True,
        },
    }
    # The handler loaded as the toolkit loads it (tests/toolkit_server.py), with only the prepared repository's package.
    toolkit = f"""
import json, sys
sys.path.insert(0, {str(ROOT / "tests")!r})
from toolkit_server import load_handler
print(json.dumps(load_handler(sys.argv[1])(json.loads(sys.stdin.read()))))
"""
    env = {key: value for key, value in offline_env().items() if key != "PYTHONPATH"}  # only the prepared repository
    done = subprocess.run(
        [sys.executable, "-c", toolkit, str(repo)],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**env, "REMOTE_VAE_FAMILIES": "sd15", "REMOTE_VAE_DEVICE": "cpu"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout.strip().splitlines()[-1])
    pixels = torch.frombuffer(bytearray(base64.b64decode(reply["inputs"])), dtype=torch.uint8).reshape(
        reply["parameters"]["shape"]
    )
    assert_pixels_close(pixels.numpy(), uint8_locally(decode_locally(reference["sd15"], latents, SD)))
