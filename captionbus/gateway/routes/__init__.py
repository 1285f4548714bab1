"""The gateway's routes, one `APIRouter` per domain: `jobs` (the job API), `openai` (OpenAI's
audio and models endpoints), `webhooks` (a job's webhook records), `health` (probes, /metrics),
`docs` (the API documents, as the gateway's docs mode says).
A new endpoint is a function in one of them (or a new router included in app.create_app)."""
