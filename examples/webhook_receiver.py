"""A captionbus webhook receiver: checks each POST's signature and prints the job event.

    CAPTIONBUS_WEBHOOK_SECRET=... python examples/webhook_receiver.py 127.0.0.1:9000

and start the gateway with the same secret and `--webhook-allow http://127.0.0.1:9000/`. Standard
library only, so it can be copied anywhere. Events of one job arrive in order, one at a time
(`X-Captionbus-Sequence` grows); a non-2xx answer makes the gateway retry with backoff, and a
gateway that dies between your 2xx and recording it makes another gateway send that event again:
delivery is at-least-once, so a receiver treats a repeated `X-Captionbus-Delivery`
(`<job>.<subscriber>.<sequence>`) as already handled (this one skips it). One secret signs the events
of every API key's jobs, and another key may aim its job's `callback_url` at your URL where the
gateway's allow-list lets it: the event's `owner` (the key's name, in the signed body; also the
header `X-Captionbus-Owner`) says whose job it is, so act only on your key's.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def verify(secret: bytes, body: bytes, header: str, tolerance_s: float = 300) -> bool:
    """`X-Captionbus-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>`."""
    try:
        fields = dict(part.split("=", 1) for part in header.split(","))
        t = int(fields["t"])
    except (ValueError, KeyError):
        return False
    if abs(time.time() - t) > tolerance_s:  # an old signature replayed
        return False
    expected = hmac.new(secret, f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, fields.get("v1", ""))


def make_server(address: tuple[str, int], secret: bytes, on_event) -> ThreadingHTTPServer:
    """A server that calls `on_event(event_dict, headers)` once per delivery id, for correctly signed POSTs.
    (Kept in memory here; a real receiver keeps the ids it handled where it keeps what it did.)"""
    seen: set[str] = set()
    seen_lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if not verify(secret, body, self.headers.get("X-Captionbus-Signature", "")):
                self.send_response(401)
                self.end_headers()
                return
            delivery = self.headers.get("X-Captionbus-Delivery", "")
            with seen_lock:
                repeated = bool(delivery) and delivery in seen
            if not repeated:
                on_event(json.loads(body), dict(self.headers))  # raises: no 2xx, the gateway retries
                with seen_lock:
                    seen.add(delivery)
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    return ThreadingHTTPServer(address, Handler)


if __name__ == "__main__":
    host, _, port = (sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:9000").rpartition(":")
    key = os.environ["CAPTIONBUS_WEBHOOK_SECRET"].encode()
    server = make_server((host, int(port)), key, lambda event, headers: print(
        headers.get("X-Captionbus-Sequence"), event["job_id"], event["kind"], flush=True))
    print(f"listening on http://{host}:{port}/", file=sys.stderr)
    server.serve_forever()
