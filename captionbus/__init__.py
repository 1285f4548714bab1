"""captionbus: films and videos to subtitles, as stage services on NATS.

This package is the launcher (CLI, runner, stack, env manager, model fetcher, embedded
nats-server): the top layer. The library every process shares is `core` (see captionbus/core/__init__.py).
"""
from captionbus.core import __version__

__all__ = ["__version__"]
