"""API keys: each names a tenant, and a request sees only its tenant's sessions.

Without keys (a gateway on loopback) every caller is trusted to name its tenant (default:
"default"). With keys, a request carries `Authorization: Bearer <key>`; its tenant is the key's,
and a request that asks for another tenant is PermissionDenied.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping
from pathlib import Path

from starlette.requests import Request

from dualpath_sdk.api.inputs import ResumeOptions, validated
from dualpath_sdk.errors import AuthenticationError, InvalidInput, PermissionDenied

MIN_KEY_CHARS = 16


class Keys:
    """API keys and the tenant each names."""

    def __init__(self, tenants: Mapping[str, str]) -> None:
        if not tenants:
            raise InvalidInput("no API keys given")
        for key, tenant in tenants.items():
            if not isinstance(key, str) or len(key) < MIN_KEY_CHARS or key != key.strip():
                raise InvalidInput(f"an API key is a string of at least {MIN_KEY_CHARS} characters")
            validated(ResumeOptions, "keys", {"session_id": "x", "tenant": tenant})
        self._tenants = dict(tenants)

    @classmethod
    def load(cls, path: Path) -> Keys:
        """A keys file: one JSON object, `{"<key>": "<tenant>", ...}`."""
        try:
            tenants = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"cannot read the keys file {path}: {exc}") from None
        if not isinstance(tenants, dict):
            raise InvalidInput(f'the keys file {path} must hold one JSON object {{"<key>": "<tenant>"}}')
        return cls(tenants)

    def tenant_of(self, key: str) -> str:
        """The key's tenant; AuthenticationError for a key it does not know. Every key is compared
        in constant time, so timing tells nothing of which one was close."""
        found = None
        for known, tenant in self._tenants.items():
            if hmac.compare_digest(known.encode(), key.encode()):
                found = tenant
        if found is None:
            raise AuthenticationError("the API key is not valid")
        return found


def tenant_for(request: Request, asked: str | None) -> str:
    """The tenant a request acts for: the key's (PermissionDenied if it asks for another), or the
    one it asks for when the gateway has no keys."""
    keys: Keys | None = request.app.state.keys
    if keys is None:
        return asked or "default"
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise AuthenticationError("an API key is required: send `Authorization: Bearer <key>`")
    tenant = keys.tenant_of(key.strip())
    if asked is not None and asked != tenant:
        raise PermissionDenied(f"the API key is for tenant {tenant!r}, not {asked!r}")
    return tenant
