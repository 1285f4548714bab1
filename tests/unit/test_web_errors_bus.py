"""A bus failure under a web door is a 503 in the one error shape, never a 500 or an empty answer."""
import nats.errors
from fastapi import FastAPI
from fastapi.testclient import TestClient

from captionbus.web import errors
from captionbus.core.bus import BusError


def test_bus_errors_are_503_in_the_error_shape():
    app = FastAPI()
    errors.install(app)

    @app.get("/refused")
    async def refused():
        raise BusError("listing jobs: no answer from NATS within 20 s (last: timeout)")

    @app.get("/timeout")
    async def timeout():
        raise nats.errors.TimeoutError

    with TestClient(app, raise_server_exceptions=False) as client:
        for path in ("/refused", "/timeout"):
            answer = client.get(path)
            assert answer.status_code == 503, (path, answer.text)
            error = answer.json()["error"]
            assert error["type"] == "service_unavailable" and error["code"] == 503
            assert error["message"].startswith("bus unavailable: ")
        assert "listing jobs: no answer from NATS" in client.get("/refused").json()["error"]["message"]
