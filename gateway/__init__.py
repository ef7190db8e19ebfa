"""`orcd gateway`: an OpenAI-compatible HTTP front end that turns each request into queued jobs.

Stateless by design: every fact a request needs (API-key limits, files, batches, job events)
lives in Redis, so any number of gateways serve the same workers, any gateway can stream any
job, and a restarted gateway loses nothing. The package never imports torch.
"""
