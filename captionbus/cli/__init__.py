"""`captionbus`: one command for one machine (`run`), and the fleet parts one by one.

The commands live by group: `local` (run, up, coordinator, dashboard, serve), `jobs` (submit,
status, jobs, events, fetch, cancel, retry, gc), `info` (workers, logs, stages, languages); the
`envs`/`models`, `subs` and `gateway` groups live beside their code. Errors are handled once, in
the root group's class (`errors.CaptionbusGroup`). The console script is `captionbus.cli:main`.
"""
from __future__ import annotations

from captionbus.cli import callout, info, jobs, local  # noqa: F401  (each registers its commands on main)
from captionbus.cli.common import check_out_dir, main, parse_options, with_job_options
from captionbus.cli.errors import CaptionbusGroup, UserError
from captionbus.cli.jobs import job_exit_code, parse_since
from captionbus.cli.local import device_envs
from captionbus.envs.cli import envs as _envs_group
from captionbus.envs.cli import models as _models_group
from captionbus.gateway.cli import gateway as _gateway_group
from captionbus.subs_cli import subs as _subs_group

for _group in (_envs_group, _models_group, _subs_group, _gateway_group):
    main.add_command(_group)

__all__ = ["CaptionbusGroup", "UserError", "check_out_dir", "device_envs", "job_exit_code", "main",
           "parse_options", "parse_since", "with_job_options"]
