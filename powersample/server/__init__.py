"""`powersample serve`: an OpenAI-compatible HTTP server that samples from p^alpha.

Layers: `protocol.py` (OpenAI request bodies and responses), `engine.py` (one thread owning the backend, batching
every request's chains), `app.py` (the FastAPI app joining them); its command line is `powersample.cli.serve`.
The server knows the API, samplers and backends, never the CLI; nothing below it imports it. Needs the `serve`
extra: pip install 'powersample[serve]'.
"""
