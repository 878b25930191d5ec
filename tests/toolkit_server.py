"""The stock Inference Endpoints toolkit's web service, as it treats a custom handler, for tests.

Written from huggingface-inference-toolkit 0.5.x's public source (webservice_starlette.py, serialization/,
utils.py, scripts/entrypoint.sh), not copied from it; it keeps what a handler meets there:
- at start-up the toolkit imports transformers, diffusers' text-to-image pipelines and sentence-transformers
  (whatever a model repository's requirements.txt installed must leave them importable), then loads
  HF_MODEL_DIR/handler.py as `handler`, with HF_MODEL_DIR first on sys.path, and builds EndpointHandler(HF_MODEL_DIR);
- a body is read by its Content-Type, matched exactly: JSON, or an image opened by Pillow and converted to RGB,
  handed over as {"inputs": image}; anything else (tensor/binary included) is a 400;
- query parameters become "parameters" when the body has none: digits as int, true/false as booleans, the rest strings;
- the reply is written by the Accept header, matched exactly, "*/*" or none meaning JSON: JSON with PIL images as
  base64 PNG, or for image/* a PIL image saved with only `format=` (Pillow's defaults otherwise);
- every failure, the handler's or the serializer's, is a 400 {"error": str(exc)}; one call at a time.

Run: HF_MODEL_DIR=DIR python tests/toolkit_server.py PORT
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import sys
from importlib.util import find_spec

import anyio
import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

JSON_TYPES = ("application/json", "application/json; charset=UTF-8")
IMAGE_TYPES = (
    "image/png",
    "image/jpeg",
    "image/jpg",
    "image/tiff",
    "image/bmp",
    "image/gif",
    "image/webp",
    "image/x-image",
)


def import_what_the_toolkit_imports() -> None:
    """The modules the toolkit imports before any handler: a requirements.txt that breaks one stops the endpoint."""
    from transformers import WhisperForConditionalGeneration, pipeline  # noqa: F401
    from transformers.file_utils import is_tf_available, is_torch_available  # noqa: F401
    from transformers.pipelines import Pipeline  # noqa: F401

    if find_spec("diffusers"):
        from diffusers import AutoPipelineForText2Image, DPMSolverMultistepScheduler, StableDiffusionPipeline  # noqa: F401
    if find_spec("sentence_transformers"):
        from sentence_transformers import CrossEncoder, SentenceTransformer, util  # noqa: F401


def load_handler(model_dir: str):
    spec = importlib.util.spec_from_file_location("handler.EndpointHandler", os.path.join(model_dir, "handler.py"))
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, model_dir)
    sys.modules["handler.EndpointHandler"] = module
    spec.loader.exec_module(module)
    return module.EndpointHandler(model_dir)


def query_parameters(request: Request) -> dict:
    def convert(value: str):
        return int(value) if value.isnumeric() else {"true": True, "false": False}.get(value.lower(), value)

    return {name: convert(value) for name, value in request.query_params.items()}


def to_json(value) -> bytes:
    def default(item):
        if isinstance(item, Image.Image):
            buffer = io.BytesIO()
            item.save(buffer, format="PNG")
            return base64.b64encode(buffer.getvalue()).decode()
        raise TypeError(f"Type is not JSON serializable: {type(item).__name__}")

    return json.dumps(value, default=default).encode()


def to_image(value, accept: str) -> bytes:
    if not isinstance(value, Image.Image):
        raise ValueError(f"Can only serialize PIL.Image.Image, got {type(value)}")
    buffer = io.BytesIO()
    value.save(buffer, format=accept.split("/")[-1].upper())
    return buffer.getvalue()


def create_app(model_dir: str) -> Starlette:
    # The toolkit's own stack (elsewhere transformers 5 has no is_tf_available)
    if os.environ.get("REMOTE_VAE_TOOLKIT_STACK") == "1":
        import_what_the_toolkit_imports()
    handler = load_handler(model_dir)
    one_at_a_time = anyio.Semaphore(1)

    async def health(request: Request) -> Response:
        return PlainTextResponse("Ok")

    async def predict(request: Request) -> Response:
        try:
            content_type = request.headers.get("content-type")
            body = await request.body()
            if content_type in JSON_TYPES:
                data = json.loads(body)
            elif content_type in IMAGE_TYPES:
                data = {"inputs": Image.open(io.BytesIO(body)).convert("RGB")}
            else:
                raise ValueError(f'Content type "{content_type}" not supported')
            if "inputs" not in data and "instances" not in data:
                raise ValueError(f"Body needs to provide a inputs key, received: {data}")
            if "parameters" not in data and request.query_params:
                data["parameters"] = query_parameters(request)
            async with one_at_a_time:
                result = await anyio.to_thread.run_sync(handler, data)
            accept = request.headers.get("accept")
            accept = "application/json" if accept in (None, "*/*") else accept
            if accept in JSON_TYPES:
                return Response(to_json(result), media_type=accept)
            if accept in IMAGE_TYPES:
                return Response(to_image(result, accept), media_type=accept)
            raise ValueError(f'Accept type "{accept}" not supported')
        except Exception as exc:  # the toolkit answers every failure so
            return Response(to_json({"error": str(exc)}), status_code=400, media_type="application/json")

    routes = [Route(path, health, methods=["GET"]) for path in ("/", "/health")]
    routes += [Route(path, predict, methods=["POST"]) for path in ("/", "/predict")]
    return Starlette(routes=routes)


if __name__ == "__main__":
    uvicorn.run(create_app(os.environ["HF_MODEL_DIR"]), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
