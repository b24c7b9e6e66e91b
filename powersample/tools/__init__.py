"""Measurement tools above the library: `powersample bench` (speed: tools.bench) and `powersample bench --fidelity`
(closeness to p^alpha per compute: tools.fidelity).

A tool drives the library as a user would, through `powersample.api.sample`, and measures what it did. Layering:
tools import core, config, backends, samplers, api, io, plots and errors, never a front-end (powersample.cli,
powersample.server) nor powersample.eval; the command lines live in powersample.cli.bench, and `powersample report`
(cli) hands eval's report the fidelity section (tools.fidelity.report.SECTION), so eval never imports a tool.

    common.py    what both tools share: the progress callback, one-line checks, the warm-up, the date, the JSON write
    machine.py   the machine a run measured on: CPUs, platform, torch, load, peak RSS, the backend's device
"""
