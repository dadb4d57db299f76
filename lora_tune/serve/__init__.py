"""`lora-tune serve`: an OpenAI-compatible HTTP server for a run, a merged folder or a GGUF file.

`protocol` reads and checks requests, `responses` writes the OpenAI JSON shapes, `stops` turns generated tokens into
text cut at stop strings, `backend` / `hf_backend` / `gguf_backend` load a model and generate tokens (a batch that
requests join, or llama.cpp slots), `worker` queues the requests and shares the model among them, `server` is the
HTTP layer (uvicorn + Starlette) with auth, limits, cancellation and a bounded stop, `start` checks the options and
binds before loading, and `vllm` prints the checked `vllm serve` command for a run's adapter.
"""
