"""The direct artifact reader reads nats-py internals: a nats-py upgrade must fail here, loudly.

`captionbus/core/artifacts/direct.py` is kept because benchmarks/artifacts.py measured it 1.5-2x the reader on
nats-py's public API on this 2-core host (its docstring has the runs). It copies the connection's
CONNECT line and checks TLS/auth through private attributes of nats-py 2.16.0. At run time another
nats-py only switches it off (`AVAILABLE`), which would hide a silent slowdown; these tests make the
upgrade a decision instead: bump the pin, and this file says what to re-measure and re-check.
"""
import asyncio
from pathlib import Path

from captionbus.core.artifacts import direct
from captionbus.core.bus import connect

REQUIREMENTS = Path(direct.__file__).resolve().parents[1] / "requirements.txt"
WHAT_TO_DO = (
    "captionbus/core/artifacts/direct.py was written for nats-py {written}; this is {found}. Re-run "
    "benchmarks/artifacts.py (direct vs chunk reader): if the direct reader still wins, check the "
    "private attributes it reads and raise WRITTEN_FOR; if not, delete direct.py"
)


def _pinned_nats_py() -> str:
    for line in REQUIREMENTS.read_text().splitlines():
        name, _, pin = line.split("#", 1)[0].strip().partition("==")
        if name.strip() == "nats-py":
            return pin.strip()
    raise AssertionError(f"{REQUIREMENTS} pins no nats-py")


def test_the_pinned_and_installed_nats_py_are_the_one_the_direct_reader_was_written_for():
    for found in (_pinned_nats_py(), direct.NATS_PY_VERSION):
        assert found == direct.WRITTEN_FOR, WHAT_TO_DO.format(written=direct.WRITTEN_FOR, found=found)
    assert direct.AVAILABLE


def test_the_private_attributes_it_reads_exist_on_a_live_connection(nats_server):
    """What `direct_endpoint` reads: a renamed attribute would silently read as 'absent'
    (getattr defaults) and send a wrong CONNECT line."""

    async def main():
        nc = await connect(nats_server, "guard")
        try:
            for name in ("_server_info", "_signature_cb", "_user_jwt_cb", "_connect_command"):
                assert hasattr(nc, name), f"nats-py has no {name}: " + WHAT_TO_DO.format(
                    written=direct.WRITTEN_FOR, found=direct.NATS_PY_VERSION)
            assert isinstance(nc._server_info, dict) and nc._server_info.get("server_id")
            host, port, line = direct.direct_endpoint(nc)
            assert line.startswith(b"CONNECT {") and line.endswith(b"\r\n"), line
            assert (host, port) == (nc.connected_url.hostname, nc.connected_url.port)
        finally:
            await nc.close()

    asyncio.run(main())
