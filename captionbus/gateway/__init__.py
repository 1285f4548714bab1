"""`captionbus gateway`: the HTTP door for integrators (job API, OpenAI-compatible audio
endpoints, webhooks). Stateless: every job lives on the bus; run as many as you like."""
