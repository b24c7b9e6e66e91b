"""The bottom layer: the backend seam's types (`types.py`) and the log-space numerics (`numerics.py`).

Numpy only; nothing here imports anything above it."""
