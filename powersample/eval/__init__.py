"""Evaluation: run a sampler over a task's problems and report accuracy, likelihoods and costs.

    tasks/       one file per task: load problems, grade a completion (math500, humaneval, gpqa, alpacaeval)
    sandbox.py   the one place generated code runs
    math_grader.py  final-answer equivalence with math-verify, in a killable worker process
    metrics.py   every number the report shows (Wilson interval, unbiased pass@k, Eq. 12 estimate, percentiles)
    records.py   a run directory: run.json, append-only records, resume
    runner.py    the loop: sample, grade, append
    distributed.py  the same units on Ray actors (`--ray`); imported only then, so Ray stays optional
    report.py    the markdown table, its sections (paired comparisons, output lengths) and the plots
    paired.py    paired comparison of two methods: cluster-bootstrap interval, exact McNemar
    trace.py     a chain trace (`sample --trace`): read it, replay one chain
    trace_report.py  `report --trace`: the chain's summary, coloured text (HTML) and plot

It builds on the API (`powersample.api.sample_many`), the sampler registry and a loaded backend (Ray workers get a
`BackendSpec`); its command line is `powersample.cli.eval`, which it never imports, and nothing below it imports it.
"""
