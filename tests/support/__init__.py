"""Helpers shared by several test modules (tests/ is on sys.path: `from support.server import serve`).

A test module imports its helpers from here, never from another test module. Each helper module imports what it needs
at its top; one that needs an optional package skips the importing test module when the package is missing
(`pytest.importorskip`), as the test module itself would.
"""
