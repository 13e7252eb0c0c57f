"""The per-filter ext_proc settings the exchange reads, built once from ExternalProcessor.

Validation of what extproc supports lives in ``extproc.config``; this module only turns an
already accepted message into an immutable value with Envoy's defaults filled in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode

from extproc.core import modes
from extproc.core.matchers import ForwardRules
from extproc.core.mutations import HeaderLimits, MutationRules

DEFAULT_MESSAGE_TIMEOUT = 0.2
# Envoy's per_connection_buffer_limit_bytes default: the most a mode may buffer.
DEFAULT_BUFFER_LIMIT = 1024 * 1024
DEFAULT_DEFERRED_CLOSE = 5.0


@dataclass(frozen=True, slots=True)
class ExchangeSettings:
    """What one HTTP exchange needs to know of the filter configuration."""

    processing_mode: ProcessingMode = field(default_factory=ProcessingMode)
    failure_mode_allow: bool = False
    message_timeout: float = DEFAULT_MESSAGE_TIMEOUT
    status_on_error: int = 500
    disable_immediate_response: bool = False
    rules: MutationRules = field(default_factory=MutationRules)
    limits: HeaderLimits = field(default_factory=HeaderLimits)
    honor_append_action: bool = False
    buffer_limit: int = DEFAULT_BUFFER_LIMIT
    allow_mode_override: bool = False
    allowed_override_modes: tuple[ProcessingMode, ...] = ()
    send_body_without_waiting_for_header_response: bool = False
    forward_rules: ForwardRules | None = None
    max_message_timeout: float = 0.0
    request_attributes: tuple[str, ...] = ()
    response_attributes: tuple[str, ...] = ()
    observability_mode: bool = False
    deferred_close_timeout: float = DEFAULT_DEFERRED_CLOSE
    receiving_namespaces: frozenset[str] = frozenset()
    forwarding_namespaces: tuple[str, ...] = ()
    # extproc only: dynamic metadata namespaces handed upstream as JSON request headers
    metadata_headers: tuple[tuple[str, bytes], ...] = ()
    # No message ever goes to the processor: the request needs no exchange at all.
    passes_through: bool = field(init=False)

    def __post_init__(self) -> None:
        passes = not self.observability_mode and modes.sends_nothing(self.processing_mode)
        object.__setattr__(self, "passes_through", passes)

    @classmethod
    def from_proto(
        cls,
        message: ext_proc_pb2.ExternalProcessor,
        *,
        limits: HeaderLimits | None = None,
        honor_append_action: bool = False,
        buffer_limit: int = DEFAULT_BUFFER_LIMIT,
        metadata_headers: tuple[tuple[str, bytes], ...] = (),
    ) -> ExchangeSettings:
        timeout = DEFAULT_MESSAGE_TIMEOUT
        if message.HasField("message_timeout"):
            timeout = message.message_timeout.ToTimedelta().total_seconds()
        status = message.status_on_error.code if message.HasField("status_on_error") else 500
        max_timeout = message.max_message_timeout.ToTimedelta().total_seconds()
        deferred = DEFAULT_DEFERRED_CLOSE
        if message.HasField("deferred_close_timeout"):
            deferred = message.deferred_close_timeout.ToTimedelta().total_seconds()
        metadata = message.metadata_options
        return cls(
            processing_mode=message.processing_mode,
            failure_mode_allow=message.failure_mode_allow,
            message_timeout=timeout,
            # Envoy accepts only 400-599 here and answers 500 for anything else.
            status_on_error=status if 400 <= status <= 599 else 500,
            disable_immediate_response=message.disable_immediate_response,
            rules=MutationRules.from_proto(message.mutation_rules),
            limits=limits or HeaderLimits(),
            honor_append_action=honor_append_action,
            buffer_limit=buffer_limit,
            allow_mode_override=message.allow_mode_override,
            allowed_override_modes=tuple(message.allowed_override_modes),
            send_body_without_waiting_for_header_response=(
                message.send_body_without_waiting_for_header_response
            ),
            max_message_timeout=max_timeout,
            request_attributes=tuple(message.request_attributes),
            response_attributes=tuple(message.response_attributes),
            observability_mode=message.observability_mode,
            deferred_close_timeout=deferred,
            receiving_namespaces=frozenset(metadata.receiving_namespaces.untyped),
            forwarding_namespaces=tuple(metadata.forwarding_namespaces.untyped),
            metadata_headers=metadata_headers,
            forward_rules=(
                ForwardRules.from_proto(message.forward_rules, "ext_proc.forward_rules")
                if message.HasField("forward_rules")
                else None
            ),
        )
