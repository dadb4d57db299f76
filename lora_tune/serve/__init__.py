"""`lora-tune serve`: an OpenAI-compatible HTTP server for a run, a merged folder or a GGUF file.

`protocol` reads and checks requests, `responses` writes the OpenAI JSON shapes, `stops` turns generated tokens into
text cut at stop strings, `backend` / `hf_backend` / `gguf_backend` load a model and generate tokens, `worker` runs
one generation at a time from a queue, and `server` is the HTTP layer (http.server) with auth, limits and shutdown.
"""
