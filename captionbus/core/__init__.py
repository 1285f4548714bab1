"""The core library: what every captionbus process imports, below the coordinator and the stages.

Layers (each may import only those below it; `lint-imports` holds them, run by the tests):

    captionbus                  launcher / CLI: cli, runner, stack, client, env manager, models,
                                the embedded nats-server
    services.<stage>            stages: domain logic only
    coordinator | captionbus.services.runtime
    core                        this package: bus client, artifacts, settings, logging, subtitle
                                engine, translation routes, hardware, retry policy
    contracts                   pydantic models and subject names (the only shared language)

Stage environments install `contracts`, `core` and `services` with the core's own dependencies
(pydantic, nats-py, structlog, PyYAML, pysubs2, regex), never the launcher's (click, rich, uv,
the nats-server binary).
"""

__version__ = "0.1.0"
