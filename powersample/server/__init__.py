"""`powersample serve`: an OpenAI-compatible HTTP server that samples from p^alpha.

Layers: `protocol.py` (OpenAI request bodies and responses), `engine.py` (one thread owning the backend, batching
every request's chains), `app.py` (the FastAPI app joining them), `cli.py` (the `serve` subcommand). The server knows
samplers and backends; nothing below it imports it. Needs the `serve` extra: pip install 'powersample[serve]'.
"""
