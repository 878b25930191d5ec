"""The HTTP layer: the app and its routes (app.py), one POST's path through the guards (pipeline.py), and the guards
themselves: connections.py (caps and timeouts on every connection), auth.py (API keys), admission.py (the bounded
queue), batching.py (requests coalesced into one model call), observability.py (request ids, logs, metrics) and
openapi.py (/openapi.json and /docs). The memory budget every request reserves from is ../memory.py."""

from .app import Registry, Slot, create_app, family_document, health_reply, load_in_background

__all__ = ["Registry", "Slot", "create_app", "family_document", "health_reply", "load_in_background"]
