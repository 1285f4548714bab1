"""captionbus: films and videos to subtitles, as stage services on NATS."""
__version__ = "0.1.0"
