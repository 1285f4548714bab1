"""The gateway's routes, one `APIRouter` per domain: `jobs` (the job API), `openai` (OpenAI's
audio and models endpoints), `webhooks` (a job's webhook records), `health` (probes, /metrics).
A new endpoint is a function in one of them (or a new router included in app.create_app)."""
