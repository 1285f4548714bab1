"""One stage, one request, one fresh interpreter: how the system we replace ran every stage of
every job. Used by warm_vs_cold.py; run with a stage environment's interpreter:

    <env python> benchmarks/seed_stage_oneshot.py STAGE OUT_DIR name=path ... [list:name=path,path]
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from captionbus.core.settings import load  # noqa: E402
from captionbus.services.runtime import SetupContext  # noqa: E402
from captionbus.services.runtime.main import load_stage  # noqa: E402
from tests.unit.stages.fake_context import make_fake_context  # noqa: E402


def main(argv: list[str]) -> int:
    started = time.perf_counter()
    stage, out_dir, *pairs = argv
    inputs, lists, params = {}, {}, {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key.startswith("list:"):
            lists[key[5:]] = [Path(v) for v in value.split(",")]
        elif key.startswith("param:"):
            params[key[6:]] = json.loads(value)
        else:
            inputs[key] = Path(value)
    definition = load_stage(stage)
    settings = load()
    resources = None
    if definition.setup:
        import structlog

        resources = definition.setup(SetupContext(stage=stage, env="oneshot", models_dir=settings.models_dir,
                                                  log=structlog.get_logger(stage)))
    ctx = make_fake_context(Path(out_dir), stage, inputs, lists, params, resources)
    outputs = definition.handle(ctx.request, ctx)
    print(json.dumps({"outputs": {k: str(v) for k, v in outputs.items()},
                      "seconds": time.perf_counter() - started}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
