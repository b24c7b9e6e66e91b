"""The bottom layer: the backend seam's types (`types.py`) and the log-space numerics (`numerics.py`), and
every random choice (`draws.py`).

Numpy only; nothing here imports anything above it."""
