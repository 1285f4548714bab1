"""The one web toolkit of the dashboard and the gateway (and of any HTTP door added later).

Each piece exists once here, not once per app:
- `listen`: HOST:PORT parsing and the loopback rule (off loopback a door needs credentials);
  the rule itself is core's (`captionbus.core.bus.is_loopback`), which bus URLs use too.
- `errors`: one error shape, `{"error": {"message", "type", "code"}}` (OpenAI's, which its client
  parses), for every refusal of every app, including Starlette's 404/405 and FastAPI's 422.
- `auth`: reading a presented secret (Bearer, or Basic's password for browsers) and comparing it
  in constant time; the Starlette middleware the dashboard puts in front of every page.
- `sse`: Server-Sent Events through sse-starlette (pings, disconnects, `retry:`), never by hand.
- `buslink`: a long-running web service's NATS connection: it starts without a bus, says so once,
  retries with backoff, answers not-ready until connected and connects again after a bus restart.
- `serve`: the uvicorn runner: SIGINT exits 130 (README's exit codes), SIGTERM a clean 0.

Import the submodule you need: `listen` and `errors` stay light (`up` checks a bind before
starting anything), the others pull in uvicorn, sse-starlette or nats.
"""
