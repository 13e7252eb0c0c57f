"""The versions of the ext_proc gRPC API: ``v3``, Envoy's since 1.20, and ``v3alpha``, the API
before it. v3 kept v3alpha's messages field for field (the request oneof is 2 to 7 in both), so
the same message classes serve both; only the service's name, and so the method path, differs.
"""

from __future__ import annotations

API_VERSIONS = ("v3", "v3alpha")
DEFAULT_API = "v3"


def service_name(api: str) -> str:
    return f"envoy.service.ext_proc.{api}.ExternalProcessor"


def process_method(api: str) -> str:
    """The path of the Process method a processor of that version registers."""
    return f"/{service_name(api)}/Process"


def other_api(api: str) -> str:
    return next(version for version in API_VERSIONS if version != api)
