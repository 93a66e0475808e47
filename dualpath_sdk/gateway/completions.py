"""The OpenAI-compatible endpoint: `POST /v1/chat/completions` and `GET /v1/models`."""

from __future__ import annotations

from starlette.routing import Route

routes: list[Route] = []
