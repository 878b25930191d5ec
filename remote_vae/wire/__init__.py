"""The wire: HTTP request in, HTTP reply out (docs/protocol.md).

Parses every request form real clients send (tensor/binary with a query string, tensor/base64, the toolkit's JSON,
bare image files), tells decode from encode, negotiates the body of the reply from output_type and Accept, and renders
results and errors. It knows nothing of Starlette: server/ hands it the parts of a request and sends back what it
returns. In order:

- http.py: the request's parts (HttpCall), its body read into parameters and bytes, replies and errors;
- parameters.py: the query parameters, declared once (read here, described by server/openapi.py);
- parse.py: the requests themselves, and the reply a decode negotiates;
- calls.py: one call's steps, inspect -> prepare -> (the model) -> render, and dispatch for handler.py.
"""

from .calls import (
    Inspected,
    Outcome,
    Prepared,
    WireRequest,
    count_headers,
    dispatch,
    inspect,
    inspect_call,
    log,
    prepare,
    prepare_call,
    prepare_inspected,
    render,
)
from .http import (
    FORMATS_BY_MEDIA_TYPE,
    JSON_TYPES,
    MAX_JSON_TOKENS,
    HttpCall,
    HttpReply,
    error_reply,
    failure_reply,
    first_accepted,
    json_too_large,
    media_type,
    read_payload,
    tensor_reply,
)
from .parameters import MAX_SHAPE_DIMS, PARAMETERS, Params
from .parse import (
    ReplyShape,
    decode_timestep,
    infer_operation,
    is_file_upload,
    mp4_options,
    negotiate_decode,
    parse_decode,
    parse_encode,
    raw_tensor,
    scaling,
)

__all__ = [
    "FORMATS_BY_MEDIA_TYPE",
    "HttpCall",
    "HttpReply",
    "Inspected",
    "JSON_TYPES",
    "MAX_JSON_TOKENS",
    "MAX_SHAPE_DIMS",
    "Outcome",
    "PARAMETERS",
    "Params",
    "Prepared",
    "WireRequest",
    "ReplyShape",
    "count_headers",
    "decode_timestep",
    "dispatch",
    "error_reply",
    "failure_reply",
    "first_accepted",
    "infer_operation",
    "inspect",
    "inspect_call",
    "is_file_upload",
    "json_too_large",
    "log",
    "media_type",
    "mp4_options",
    "negotiate_decode",
    "parse_decode",
    "parse_encode",
    "prepare",
    "prepare_call",
    "prepare_inspected",
    "raw_tensor",
    "read_payload",
    "render",
    "scaling",
    "tensor_reply",
]
