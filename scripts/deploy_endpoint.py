"""Deploy remote-vae on Hugging Face Inference Endpoints.

Two ways:

  # 1. The container image (the full protocol, tensor/binary included), built from this repo's Dockerfile
  #    and pushed to a registry the endpoint can pull from:
  python scripts/deploy_endpoint.py deploy vae-sd15 --image ghcr.io/you/remote-vae:latest --family sd15
  --generate-api-key

  # 2. The stock toolkit's custom-handler path (JSON and image bodies only): a model repository holding
  #    handler.py, the package, requirements.txt and the weights, then an endpoint on the default image:
  python scripts/deploy_endpoint.py prepare-repo ./vae-sd15-repo --family sd15 --push you/vae-sd15-endpoint
  python scripts/deploy_endpoint.py deploy vae-sd15 --handler --repository you/vae-sd15-endpoint --family sd15

`deploy` creates the endpoint, or updates it when one of that name exists, waits until it answers its
health route, and prints its URL with diffusers code to call it. `--dry-run` prints the exact HTTP request
instead (secrets and token redacted) and sends nothing. The Hub token comes from `hf auth login`, HF_TOKEN
or --token.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from huggingface_hub import HfApi, constants  # noqa: E402
from huggingface_hub.errors import HfHubHTTPError, InferenceEndpointError, InferenceEndpointTimeoutError  # noqa: E402
from packaging.version import Version  # noqa: E402

from remote_vae import families  # noqa: E402
from remote_vae.families import Family, FamilyError  # noqa: E402
from remote_vae.server.auth import ApiKeyError, load_api_keys  # noqa: E402
from remote_vae.vae import WEIGHT_FILES, download_weights, weights_folder  # noqa: E402

CONTAINER_PORT = 8000
HEALTH_ROUTE = "/health"
API_KEY_VARIABLE = "REMOTE_VAE_API_KEY"
# What a model repository for the stock toolkit carries besides the weights, and its requirements.txt:
# what installs over the toolkit image's packages without moving them.
PACKAGE_FILES = ("handler.py", "remote_vae", "configs")
TOOLKIT_REQUIREMENTS = ROOT / "deploy" / "toolkit" / "requirements.txt"


class DeployError(RuntimeError):
    """Settings that cannot make a working endpoint; reported, then exit 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    deploy = commands.add_parser("deploy", help="create or update an endpoint, wait for it, print how to call it")
    deploy.add_argument("name", help="endpoint name (lowercase letters, digits and '-')")
    deploy.add_argument(
        "--family",
        action="append",
        required=True,
        dest="families",
        metavar="FAMILY",
        help=f"repeat to serve several on one endpoint (custom image only): {', '.join(families.available())}",
    )
    image = deploy.add_mutually_exclusive_group(required=True)
    image.add_argument(
        "--image", metavar="URL", help="the remote-vae container image, e.g. ghcr.io/you/remote-vae:latest"
    )
    image.add_argument(
        "--handler",
        action="store_true",
        help="run handler.py from --repository on the stock toolkit image (prepare it with prepare-repo)",
    )
    deploy.add_argument(
        "--repository",
        metavar="REPO_ID",
        help="model repository mounted at /repository (default for --image: the family's own Hub repository when its "
        "VAE is at the root)",
    )
    deploy.add_argument("--revision", help="commit of --repository to deploy")
    deploy.add_argument("--vendor", default="aws")
    deploy.add_argument("--region", default="us-east-1")
    deploy.add_argument("--accelerator", default="gpu")
    deploy.add_argument(
        "--instance-type",
        default="nvidia-l4",
        help="e.g. nvidia-l4 (24 GB, images), nvidia-l40s (48 GB, video), nvidia-a100 (80 GB)",
    )
    deploy.add_argument("--instance-size", default="x1")
    deploy.add_argument("--min-replicas", type=int, default=1)
    deploy.add_argument("--max-replicas", type=int, default=1)
    deploy.add_argument(
        "--scale-to-zero-minutes",
        type=int,
        metavar="N",
        help="scale to zero after N idle minutes (sets --min-replicas 0)",
    )
    key = deploy.add_mutually_exclusive_group()
    key.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="the service's API key, read from this environment variable; sent as the endpoint secret "
        f"{API_KEY_VARIABLE}",
    )
    key.add_argument(
        "--generate-api-key", action="store_true", help="make a random API key, send it as a secret and print it once"
    )
    deploy.add_argument(
        "--type",
        choices=["public", "authenticated", "private"],
        help="who may reach the URL (default: public with an API key, else authenticated, i.e. a Hugging Face token)",
    )
    deploy.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="more container environment, e.g. REMOTE_VAE_MAX_BATCH=8 (any serve option)",
    )
    deploy.add_argument("--registry-username", help="for a private image")
    deploy.add_argument(
        "--registry-password-env", metavar="VAR", help="environment variable holding the registry password or token"
    )
    deploy.add_argument("--namespace", help="user or organisation (default: the token's user)")
    deploy.add_argument("--token", help="Hugging Face token (default: the logged-in one)")
    deploy.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the endpoint (default 1800)")
    deploy.add_argument("--poll-seconds", type=float, default=10)
    deploy.add_argument("--no-wait", action="store_true")
    deploy.add_argument(
        "--dry-run", action="store_true", help="print the exact request (secrets redacted) and send nothing"
    )

    prepare = commands.add_parser(
        "prepare-repo", help="lay out a model repository for the stock toolkit's custom-handler path"
    )
    prepare.add_argument("directory", type=Path)
    prepare.add_argument("--family", required=True)
    prepare.add_argument(
        "--model",
        type=Path,
        metavar="DIR",
        help="a local diffusers model directory with the weights (default: download the family's from the Hub)",
    )
    prepare.add_argument(
        "--push", metavar="REPO_ID", help="then upload it to this Hub model repository (created private if missing)"
    )
    prepare.add_argument("--token")
    return parser


# ---------------------------------------------------------------- deploy


def endpoint_arguments(args: argparse.Namespace, served: list[Family]) -> dict:
    """Keyword arguments for HfApi.create_inference_endpoint."""
    if args.handler and len(served) > 1:
        raise DeployError("the toolkit's handler serves one family; deploy one endpoint per family, or use --image")
    if args.handler and not args.repository:
        raise DeployError("--handler needs --repository: a model repository made by `prepare-repo --push`")
    api_key = api_key_from(args)
    if args.handler and api_key:
        raise DeployError(
            "the stock toolkit does not check remote-vae API keys; with --handler the endpoint is guarded by Hugging "
            "Face tokens (--type authenticated)"
        )
    endpoint_type = args.type or ("public" if api_key else "authenticated")
    if api_key and endpoint_type == "authenticated":
        raise DeployError(
            "an authenticated endpoint takes the caller's Hugging Face token in the same Authorization header as the "
            "API key; use --type public (the key guards it) or drop the key"
        )
    if args.min_replicas < 0 or args.max_replicas < max(1, args.min_replicas):
        raise DeployError("--max-replicas must be at least 1 and at least --min-replicas")

    environment = {"REMOTE_VAE_FAMILIES": " ".join(family.name for family in served)}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise DeployError(f"--env {item!r}: expected NAME=VALUE")
        environment[name] = value

    arguments = dict(
        repository=args.repository or default_repository(served),
        revision=args.revision,
        framework="custom",
        task="custom",
        vendor=args.vendor,
        region=args.region,
        accelerator=args.accelerator,
        instance_type=args.instance_type,
        instance_size=args.instance_size,
        min_replica=0 if args.scale_to_zero_minutes else args.min_replicas,
        max_replica=args.max_replicas,
        scale_to_zero_timeout=args.scale_to_zero_minutes or (15 if args.min_replicas == 0 else None),
        env=environment,
        secrets={API_KEY_VARIABLE: api_key} if api_key else None,
        type=endpoint_type,
        namespace=args.namespace,
        token=args.token,
    )
    if args.image:
        image = {"url": args.image, "port": CONTAINER_PORT, "healthRoute": HEALTH_ROUTE}
        if args.registry_username:  # inside the image, so that updates keep them too
            image["credentials"] = {
                "username": args.registry_username,
                "password": os.environ.get(args.registry_password_env or "", ""),
            }
        arguments["custom_image"] = image
    return arguments


def default_repository(served: list[Family]) -> str:
    """The family's Hub repository, which the endpoint mounts at /repository, when it holds just the VAE."""
    family = served[0]
    if len(served) == 1 and not family.hub_subfolder:
        return family.hub_repo
    raise DeployError(
        f"pass --repository: {'these families are' if len(served) > 1 else family.name + ' is'} not one Hub repository "
        "holding only a VAE "
        f"({family.hub_repo} would be mounted whole). Use one made by `prepare-repo --push`, or any small repository "
        "when the image has baked weights (BAKE_FAMILIES) or may fetch them from the Hub."
    )


def api_key_from(args: argparse.Namespace) -> str | None:
    if args.generate_api_key:
        return secrets.token_hex(32)
    if args.api_key_env:
        key = os.environ.get(args.api_key_env)
        if not key:
            raise DeployError(f"--api-key-env {args.api_key_env}: that environment variable is not set")
        try:  # the server's own rule: a key it would refuse at start-up is refused here, before deploying
            load_api_keys(key, None)
        except ApiKeyError as exc:
            raise DeployError(f"--api-key-env {args.api_key_env}: {exc}") from None
        return key
    return None


# The endpoint's state fields an update may change; vendor, region and type are fixed at creation.
UPDATABLE = (
    "repository",
    "revision",
    "framework",
    "task",
    "accelerator",
    "instance_type",
    "instance_size",
    "min_replica",
    "max_replica",
    "scale_to_zero_timeout",
    "custom_image",
    "env",
    "secrets",
    "namespace",
    "token",
)


def deploy(args: argparse.Namespace) -> int:
    served = [families.load_family(name) for name in args.families]
    arguments = endpoint_arguments(args, served)
    api = HfApi(token=args.token)
    if args.dry_run:
        arguments["namespace"] = arguments["namespace"] or "YOUR_NAMESPACE"
        print(json.dumps(record_request(lambda: api.create_inference_endpoint(args.name, **arguments)), indent=2))
        print(
            "# not sent. If the endpoint exists, deploy sends a PUT to .../endpoint/NAMESPACE/NAME with these model, "
            "compute and scaling fields.",
            file=sys.stderr,
        )
        return 0

    namespace = arguments["namespace"] = args.namespace or api.whoami()["name"]
    if exists(api, args.name, namespace):
        endpoint = api.update_inference_endpoint(
            args.name, **{key: arguments[key] for key in UPDATABLE if key in arguments}
        )
        print(f"updated endpoint {namespace}/{args.name}")
    else:
        endpoint = api.create_inference_endpoint(args.name, **arguments)
        print(f"created endpoint {namespace}/{args.name}")
    if args.no_wait:
        print(f"not waiting; follow it at https://endpoints.huggingface.co/{namespace}/endpoints/{args.name}")
        return 0
    print(f"waiting for it to answer {HEALTH_ROUTE} (up to {args.timeout:g} s)...", flush=True)
    try:
        endpoint.wait(timeout=args.timeout, refresh_every=args.poll_seconds)
    except (InferenceEndpointError, InferenceEndpointTimeoutError) as exc:
        print(f"error: {exc} (status: {endpoint.status})", file=sys.stderr)
        return 1
    print(usage(endpoint.url, served, arguments, via_handler=args.handler))
    return 0


def exists(api: HfApi, name: str, namespace: str) -> bool:
    try:
        api.get_inference_endpoint(name, namespace=namespace)
    except HfHubHTTPError as exc:
        if exc.response is not None and exc.response.status_code == 404:
            return False
        raise
    return True


def usage(url: str, served: list[Family], arguments: dict, via_handler: bool) -> str:
    """The URL and diffusers code to paste, for each family."""
    lines = [f"endpoint ready: {url}", ""]
    api_key = (arguments.get("secrets") or {}).get(API_KEY_VARIABLE)
    if api_key:
        lines += [f"API key (shown once; the endpoint holds it as the secret {API_KEY_VARIABLE}):", f"  {api_key}", ""]
    if via_handler:
        lines += [
            'The stock toolkit takes JSON: POST {"inputs": <base64 latent bytes>, "parameters": {"shape": [...], '
            '"dtype": ..., ...}}',
            "with 'Authorization: Bearer <your Hugging Face token>'. diffusers' remote_decode needs the container "
            "image (--image).",
        ]
        return "\n".join(lines)
    key_source = f'os.environ["{API_KEY_VARIABLE}"]' if api_key else 'os.environ["HF_TOKEN"]'
    code = [
        "# --- diffusers ---",
        "import os",
        "import requests",
        "import torch",
        "from diffusers.utils import remote_utils",
        "from diffusers.utils.remote_utils import remote_decode",
        "",
        "session = requests.Session()",
        f'session.headers["Authorization"] = "Bearer " + {key_source}',
        "remote_utils.requests = session  # remote_decode / remote_encode send the header",
    ]
    for family in served:
        endpoint = url.rstrip("/") + (f"/{family.name}/" if len(served) > 1 else "/")
        scaling = ", ".join(f"{name}={value!r}" for name, value in family.client_scaling().items())
        channels, f = family.latent_channels, family.spatial_compression
        if family.is_video:
            code += [
                f"latents = torch.randn(1, {channels}, 3, 64 // {f}, 64 // {f})  # {family.name}: your pipeline's "
                "output_type='latent'",
                f'video = remote_decode(endpoint="{endpoint}", tensor=latents, {scaling}, output_type="mp4", '
                'return_type="mp4")',
                f'open("{family.name}.mp4", "wb").write(video)',
            ]
        else:
            code += [
                f"latents = torch.randn(1, {channels}, 64 // {f}, 64 // {f})  # {family.name}: your pipeline's "
                "output_type='latent'",
                f'image = remote_decode(endpoint="{endpoint}", tensor=latents, {scaling}, image_format="png")',
                f'image.save("{family.name}.png")',
            ]
    return "\n".join(lines + code + ["# --- end ---"])


@contextmanager
def _loopback_api(record: list[dict]):
    """A stand-in for the Inference Endpoints API on 127.0.0.1 that notes each request and answers 418."""

    class Recorder(BaseHTTPRequestHandler):
        def _note(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            record.append({"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body})
            self.send_response(418)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": "dry run"}')

        do_GET = do_POST = do_PUT = _note

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    real_base = constants.INFERENCE_ENDPOINTS_ENDPOINT
    constants.INFERENCE_ENDPOINTS_ENDPOINT = f"http://127.0.0.1:{server.server_port}/v2"
    try:
        yield real_base
    finally:
        constants.INFERENCE_ENDPOINTS_ENDPOINT = real_base
        server.shutdown()
        server.server_close()


def record_request(send) -> dict:
    """The request huggingface_hub would send, caught on loopback instead of the API: method, URL, JSON body."""
    record: list[dict] = []
    with _loopback_api(record) as real_base:
        try:
            send()
        except HfHubHTTPError:
            pass  # the stand-in's 418
    if len(record) != 1:
        raise DeployError(f"expected one request, caught {len(record)}")
    request = record[0]
    body = json.loads(request["body"])
    for secret_name in body.get("model", {}).get("secrets") or {}:
        body["model"]["secrets"][secret_name] = "<redacted>"
    credentials = body.get("model", {}).get("image", {}).get("custom", {}).get("credentials") or {}
    if "password" in credentials:
        credentials["password"] = "<redacted>"
    return {"method": request["method"], "url": real_base + request["path"].removeprefix("/v2"), "json": body}


# ---------------------------------------------------------------- prepare-repo


def toolkit_diffusers() -> str:
    """The diffusers release the toolkit's requirements pin."""
    return re.search(r"^diffusers==(\S+)", TOOLKIT_REQUIREMENTS.read_text(), re.MULTILINE).group(1)


def prepare_repo(args: argparse.Namespace) -> int:
    family = families.load_family(args.family)
    pinned = toolkit_diffusers()
    if family.min_diffusers and Version(family.min_diffusers) > Version(pinned):
        raise DeployError(
            f"{family.name} needs diffusers >= {family.min_diffusers}; the stock toolkit runs {pinned} at most "
            "(newer releases do not import beside its transformers 4.x): deploy the container image (--image) instead"
        )
    target: Path = args.directory
    if target.exists() and any(target.iterdir()):
        raise DeployError(f"{target} exists and is not empty")
    target.mkdir(parents=True, exist_ok=True)
    for name in PACKAGE_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, target / name)
    shutil.copy2(TOOLKIT_REQUIREMENTS, target / "requirements.txt")
    if args.model:
        copy_weights(family, args.model, target)
    else:
        download_weights(family, target)
    (target / "README.md").write_text(model_card(family))
    print(f"prepared {target}: {', '.join(sorted(path.name for path in target.iterdir()))}")
    if args.push:
        api = HfApi(token=args.token)
        api.create_repo(args.push, private=True, exist_ok=True)
        commit = api.upload_folder(
            folder_path=target, repo_id=args.push, commit_message=f"remote-vae handler for {family.name}"
        )
        print(f"pushed to https://huggingface.co/{args.push} ({commit.oid})")
        print(
            f"deploy: python scripts/deploy_endpoint.py deploy NAME --handler --repository {args.push} --family "
            f"{family.name}"
        )
    return 0


def copy_weights(family: Family, model: Path, target: Path) -> None:
    source = weights_folder(family, model) or model
    for name in WEIGHT_FILES:
        if not (source / name).is_file():
            raise DeployError(f"{source} has no {name}: expected a diffusers model directory")
        shutil.copy2(source / name, target / name)


def model_card(family: Family) -> str:
    return f"""---
tags: [remote-vae, inference-endpoints-handler]
---
# remote-vae handler: {family.name}

{family.description}. Weights from `{family.hub_repo}`{f" (`{family.hub_subfolder}/`)" if family.hub_subfolder else ""},
served by remote-vae's `handler.py` on the Inference Endpoints toolkit. Set `REMOTE_VAE_FAMILIES={family.name}` in the
endpoint's environment; limits are the
`REMOTE_VAE_*` variables of `python -m remote_vae serve`.

The toolkit passes JSON and image bodies only: send latents as base64 in
`{{"inputs": ..., "parameters": {{"shape": [...], "dtype": "float16", ...}}}}`.
diffusers' `remote_decode` (raw `tensor/binary`) needs the remote-vae container image instead.
"""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return deploy(args) if args.command == "deploy" else prepare_repo(args)
    except (DeployError, FamilyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
