"""The HTTP gateway: a cluster's sessions, an OpenAI-compatible endpoint, keys and tenants."""

from dualpath_sdk.gateway.app import create_app
from dualpath_sdk.gateway.auth import Keys

__all__ = ["Keys", "create_app"]
