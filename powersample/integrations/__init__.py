"""Front doors into other tools' own interfaces: `lm_eval.py`, the lm-evaluation-harness model `powersample`.

Each module imports its tool at the top and is itself imported only when used (`powersample lm-eval`, or a user's
`import powersample.integrations.lm_eval`), so the package imports without those tools installed. Layer: above
eval, server and tools, below the command line.
"""
