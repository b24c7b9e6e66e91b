"""schemathesis hooks for tests/test_server_fuzz.py (loaded through SCHEMATHESIS_HOOKS, in schemathesis's process),
and the fuzz server's defaults and limits, which the test starts it with.

Two rules of the server join fields in ways JSON Schema cannot state: the budget of a request (prompts x n x the
members of a chain, times max_tokens; bon's token budget: `protocol.check_budget`), and power-pt's ladder (as many
powers in `alphas` as `replicas`, increasing, the last one `alpha`; `alpha_min` below `alpha`). A schema-valid body
against either gets a 400 that positive_data_acceptance reports. Such a failure is dropped here only when the
server's own rule, run on the very body under the fuzz server's defaults and limits, refuses it with the same
message: any other 400 for a schema-valid body still fails the run.
"""

from __future__ import annotations

import json

import schemathesis

from powersample.config import SamplerConfig
from powersample.server.protocol import (
    ApiError,
    ChatBody,
    CompletionBody,
    Limits,
    check_budget,
    parse_body,
    prompt_list,
    sampler_config,
)

FUZZ_DEFAULTS = SamplerConfig(max_new_tokens=6, block_size=3, mcmc_steps=2)
FUZZ_LIMITS = Limits(max_tokens=16, max_mcmc_steps=4, max_members=64, max_work=512, request_timeout=30)

BUDGET = ("the request asks for", "bon's budget")  # how protocol.check_budget's messages start
LADDER = ("alphas lists", "alphas must be positive", "alphas must end at alpha", "alpha_min must be below")  # how
# power-pt's ladder rule (samplers/tempering.check_ladder) words its refusals: the count of a string's numbers, their
# order, and two fields compared


@schemathesis.hook
def filter_failure(context, failure, case, response) -> bool:
    """Keep every failure but a schema-valid body refused by the budget rule (see the module docstring)."""
    if failure.code != "ST202" or response.status_code != 400:
        return True
    error = json.loads(response.content).get("error", {})
    message = str(error.get("message", ""))
    if message.startswith(LADDER):
        return ladder_refusal(case.path, case.body) != message
    if error.get("code") != "over_limit" or not message.startswith(BUDGET):
        return True
    return budget_refusal(case.path, case.body) != error["message"]


def ladder_refusal(path: str, data: dict) -> str | None:
    """The message of the server's 400 for this body when its ladder rule refuses it (under the fuzz server's
    defaults), else None."""
    body = parse_body(CompletionBody if path == "/v1/completions" else ChatBody, data)
    try:
        sampler_config(body, FUZZ_DEFAULTS)
    except ApiError as e:
        return e.message if e.message.startswith(LADDER) else None
    return None


def budget_refusal(path: str, data: dict) -> str | None:
    """The message of the budget rule's 400 for this body on the fuzz server, or None when the rule lets it through."""
    body = parse_body(CompletionBody if path == "/v1/completions" else ChatBody, data)
    config, _ = sampler_config(body, FUZZ_DEFAULTS)
    prompts = len(prompt_list(body)) if isinstance(body, CompletionBody) else 1
    try:
        check_budget(config, prompts, body.n, FUZZ_LIMITS)
    except ApiError as e:
        return e.message
    return None
