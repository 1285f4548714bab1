class StageError(Exception):
    """Base for errors a stage raises on purpose. The message is shown to a person: one line
    saying what is wrong and what to do, never a traceback."""


class BadInput(StageError):
    """Permanent: the input can never work (corrupt file, no audio, unknown language).
    The request is terminated (no redelivery) and the job fails with this message."""


class Retryable(StageError):
    """Transient: try again later (a resource is busy, a peer is down). Nak'ed with delay;
    after max_deliver tries the job fails."""


class Cancelled(StageError):
    """The job ended (cancelled, or failed elsewhere) while this request ran. Raised from
    ctx.progress()/ctx.check_cancelled() in the handler; the request is dropped quietly."""
