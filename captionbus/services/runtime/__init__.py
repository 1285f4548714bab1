"""The bus plumbing every stage service shares: consume, heartbeat, ack/nak/term, artifacts,
progress, worker registration, logging. A stage module supplies a StageDefinition only."""
from captionbus.services.runtime.definition import SetupContext, StageContext, StageDefinition
from captionbus.services.runtime.errors import BadInput, Cancelled, Retryable, StageError

__all__ = ["SetupContext", "StageContext", "StageDefinition", "BadInput", "Cancelled", "Retryable", "StageError"]
