"""v2mount: serve Python models over the Open Inference Protocol from any ASGI app."""

from __future__ import annotations
