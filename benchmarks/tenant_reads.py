"""What tenancy on the bus costs a reader (deploy/README.md, "Tenancy on the bus").

A real nats-server behind the auth callout (captionbus.authcallout, as the security tests run it)
holds JOBS job records of tenant `client` and as many of tenant `other`. Measured, each as
`captionbus.client` does it:

- `list_jobs` as tenant `client` (a consumer on `client.>`, then a direct get per job) against
  the trusted gateway role's listing of every job (nats-py `kv.keys()`, then `STREAM.MSG.GET`s);
- one `job_state` read: a tenant's direct get against the gateway's `STREAM.MSG.GET`;
- an artifact fetched (ARTIFACT_MB, a fresh local root each time) from the tenant's namespace: as
  the tenant's client (consumers only: metadata, chunk count, chunks) against a trusted reader.

    python benchmarks/tenant_reads.py [--jobs 200] [--reads 200]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from captionbus import client  # noqa: E402
from captionbus.authcallout import Callout, read_users  # noqa: E402
from captionbus.contracts import ArtifactRef, JobSpec, JobState, new_job_id, subjects  # noqa: E402
from captionbus.contracts.jobs import JobStatus  # noqa: E402
from captionbus.core.artifacts import ArtifactStore  # noqa: E402
from captionbus.core.bus import connect, provision  # noqa: E402
from captionbus.core.settings import Settings  # noqa: E402
from tests.natsroles import CALLOUT_USER, callout_server  # noqa: E402

USERS = {"coordinator": "COORDINATOR", "client": "CLIENT", "other": "CLIENT", "gateway": "HTTP_GATEWAY"}
INPUT = ArtifactRef(key="a" * 64, name="film.mp4", size=1)
ARTIFACT_MB = 20
FETCHES = 5


async def bench(tmp: Path, jobs: int, reads: int) -> dict:
    with callout_server(tmp, USERS) as (urls, _log, accounts, seed):
        callout = Callout(read_users(accounts), seed)
        auth = await connect(urls[CALLOUT_USER], "auth-callout", Settings(nats_auth_callout=False))
        stop, ready = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(callout.serve(auth, stop, ready))
        await ready.wait()
        nc = {u: await connect(urls[u], f"bench-{u}", Settings(nats_auth_callout=True)) for u in USERS}
        try:
            await provision(nc["coordinator"].jetstream())
            kv = await nc["coordinator"].jetstream().key_value(subjects.JOBS_BUCKET)
            mine = []
            for tenant in ("client", "other"):
                for _ in range(jobs):
                    state = JobState(spec=JobSpec(job_id=new_job_id(tenant), input=INPUT), status=JobStatus.completed)
                    await kv.put(subjects.job_key(state.job_id), state.model_dump_json().encode())
                    if tenant == "client":
                        mine.append(state.job_id)
            out = {}
            for role, tenant in (("client", "client"), ("gateway", None)):
                js = nc[role].jetstream()
                with client.acting_for(tenant):
                    t0 = time.perf_counter()
                    listed = await client.list_jobs(js)
                    out[f"list_jobs as {role}: jobs, s"] = (len(listed), round(time.perf_counter() - t0, 3))
                    times = []
                    for i in range(reads):
                        t0 = time.perf_counter()
                        assert await client.job_state(js, mine[i % len(mine)]) is not None
                        times.append(time.perf_counter() - t0)
                    out[f"job_state as {role}: median ms"] = round(statistics.median(times) * 1000, 2)
            media = tmp / "film.bin"
            media.write_bytes(os.urandom(ARTIFACT_MB << 20))
            with client.acting_for("client"):
                ref = await client.artifacts_of(ArtifactStore(_home(tmp, "up"), nc["client"].jetstream()), None).put(media)
            for role, tenant in (("client", "client"), ("gateway", None)):
                times = []
                for i in range(FETCHES):
                    with client.acting_for(tenant):
                        store = client.artifacts_of(ArtifactStore(_home(tmp, f"{role}{i}"), nc[role].jetstream()),
                                                    "client_j0")
                        t0 = time.perf_counter()
                        await store.get(ref)
                        times.append(time.perf_counter() - t0)
                out[f"{ARTIFACT_MB} MB fetch as {role}: median s"] = round(statistics.median(times), 3)
            return out
        finally:
            for conn in nc.values():
                await conn.close()
            stop.set()
            await task
            await auth.close()


def _home(tmp: Path, name: str) -> Settings:
    return Settings(home=tmp / name, artifacts_mode="object")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=200, help="job records per tenant")
    parser.add_argument("--reads", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name, value in asyncio.run(bench(Path(tmp), args.jobs, args.reads)).items():
            print(f"{name}: {value}")


if __name__ == "__main__":
    main()
