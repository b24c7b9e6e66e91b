"""Power sampling from p(x)^alpha (Karan & Du, 2025) as a transformers `custom_generate` method, run by powersample.

    out = model.generate(**inputs, custom_generate=REPO_OR_PATH, trust_remote_code=True, power_alpha=4.0)

transformers calls `generate(model, **every argument of model.generate)`. What it takes from there:

- the generation config (the model's, a `generation_config`, or keyword arguments over it, merged as transformers'
  own generate merges them): `max_new_tokens` (else `max_length` minus the prompt's width), `eos_token_id`,
  `pad_token_id` and `num_return_sequences`, and `return_dict_in_generate`. Its sampling knobs (`do_sample`,
  `temperature`, `top_k`, `top_p`) are not read: power sampling always samples, with its own proposal;
- `power_<field>` for every field of powersample's SamplerConfig (`power_method`, `power_alpha`, `power_block_count`,
  `power_mcmc_steps`, `power_proposal_temperature`, `power_top_k`, ...) but max_new_tokens, and `power_seed`
  (default: drawn from torch's global generator, so `torch.manual_seed` makes a call repeatable);
- `input_ids` (or `inputs`) with an optional `attention_mask`: each row's prompt is its ids where the mask is 1, so
  left-padded batches work.

Output row i * n + j (n = num_return_sequences) is chain i * n + j of `powersample.sample(backend, ..., seed=seed,
num_samples=rows * n)` on prompt i: row i's chains are those of `sample(prompt_i, seed=seed, num_samples=n)` when
i = 0, and every chain draws from its own seed. All chains decode together as one batch. It returns what
`model.generate` returns: the input ids (padding included) followed by the new ids, rows that ended early padded
with `pad_token_id` (else the first EOS id), as a LongTensor, or a GenerateDecoderOnlyOutput with
`return_dict_in_generate`. What power sampling cannot honour (beams, scores, logits processors, streamers, stop
strings, ...) is a ValueError, never silently ignored.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput

import powersample
from powersample.api import make_chains
from powersample.config import SPECS
from powersample.samplers import programs, registry
from powersample.samplers.driver import drive

PREFIX = "power_"  # the prefix of powersample's own keyword arguments
SEED = PREFIX + "seed"
KNOBS = {PREFIX + name: name for name in SPECS if name != "max_new_tokens"}  # power_alpha -> alpha; the length
# is the generation config's
NOT_SUPPORTED = (  # arguments of model.generate that change decoding in ways power sampling cannot follow
    "logits_processor",
    "stopping_criteria",
    "prefix_allowed_tokens_fn",
    "assistant_model",
    "streamer",
    "negative_prompt_ids",
    "negative_prompt_attention_mask",
    "synced_gpus",
    "inputs_embeds",
)
NO_OUTPUTS = ("output_scores", "output_logits", "output_attentions", "output_hidden_states")  # per-step outputs:
# a power sample is no sequence of next-token draws, so it has none


def generate(model: Any, inputs: torch.Tensor | None = None, generation_config: Any = None, **kwargs: Any) -> Any:
    """Power samples for every row of `input_ids`, as `model.generate` returns them (see the module docstring)."""
    knobs, seed = _power_arguments(kwargs)
    input_ids, mask = _inputs(inputs, kwargs)
    kwargs.pop("tokenizer", None)  # transformers' generate takes one for stop strings; nothing here decodes text
    _refuse(name for name in NOT_SUPPORTED if kwargs.pop(name, None) is not None)
    generation_config, kwargs = _sampling(generation_config, kwargs)
    config, rest = model._prepare_generation_config(generation_config, **kwargs)  # as transformers' own generate
    _refuse(name for name, value in rest.items() if value is not None)
    _check_generation_config(config)
    sampler = powersample.SamplerConfig(max_new_tokens=_max_new_tokens(config, input_ids.shape[1]), **knobs)
    eos = _ids(config.eos_token_id)
    backend = powersample.from_transformers(model, None, eos_ids=eos)  # token ids only
    n = config.num_return_sequences or 1
    if n < 1:
        raise ValueError(f"num_return_sequences must be >= 1, got {n}")
    new = sample_ids(backend, _prompts(input_ids, mask), sampler, _seed(seed), n)
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    sequences = torch.cat([input_ids.repeat_interleave(n, dim=0), _padded(new, pad, input_ids.device)], dim=1)
    return GenerateDecoderOnlyOutput(sequences=sequences) if config.return_dict_in_generate else sequences


def sample_ids(
    backend: Any, prompts: list[tuple[int, ...]], config: powersample.SamplerConfig, seed: int, n: int
) -> list[tuple[int, ...]]:
    """The new ids of n samples per prompt, prompt-major, all chains decoding together: sample k is chain k of
    make_chains(seed, len(prompts) * n), as `powersample.sample` numbers its chains."""
    chains = make_chains(seed, len(prompts) * n)
    work = [p for i, ids in enumerate(prompts) for p in programs(backend, ids, config, chains[i * n : (i + 1) * n])]
    return [result.tokens for result in drive(backend, work, registry.proposal(config))]


def _sampling(generation_config: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The generation config and keyword arguments with do_sample on, copied: power sampling always samples, and
    transformers refuses num_return_sequences > 1 from a greedy config. A given config gets it on a copy, so that
    no keyword argument is added beside it (transformers warns about both at once)."""
    if generation_config is None or "do_sample" in kwargs:
        kwargs = {**kwargs, "do_sample": True}
    if generation_config is not None:
        generation_config = copy.deepcopy(generation_config)
        generation_config.do_sample = True
    return generation_config, kwargs


def _power_arguments(kwargs: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    """Pop the `power_*` arguments: (SamplerConfig fields, the seed); an unknown one is a ValueError."""
    ours = {name: kwargs.pop(name) for name in [k for k in kwargs if k.startswith(PREFIX)]}
    seed = ours.pop(SEED, None)
    unknown = sorted(set(ours) - set(KNOBS))
    if unknown:
        hint = " (the length is the generation config's max_new_tokens)" if f"{PREFIX}max_new_tokens" in unknown else ""
        raise ValueError(f"unknown power sampling argument {unknown[0]}{hint}; choose from {SEED}, {', '.join(KNOBS)}")
    return {KNOBS[name]: value for name, value in ours.items()}, seed


def _inputs(inputs: torch.Tensor | None, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids (B, L), attention mask (B, L)): from `inputs` or `input_ids`; no mask = every id is the prompt's."""
    input_ids = kwargs.pop("input_ids", None)
    if (inputs is None) == (input_ids is None):
        raise ValueError("power sampling needs the prompt ids: pass input_ids (or inputs), once")
    ids = inputs if input_ids is None else input_ids
    if not (isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point()):
        raise ValueError("input_ids must be a (batch, length) tensor of token ids")
    mask = kwargs.pop("attention_mask", None)
    if mask is None:
        return ids, torch.ones_like(ids)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}")
    return ids, mask


def _prompts(input_ids: torch.Tensor, mask: torch.Tensor) -> list[tuple[int, ...]]:
    """Each row's prompt: its ids where the mask is 1 (left or right padding dropped)."""
    rows = [tuple(row[keep.bool()].tolist()) for row, keep in zip(input_ids.cpu(), mask.cpu())]
    if not rows:
        raise ValueError("input_ids holds no rows")
    if not all(rows):
        raise ValueError("a row of input_ids has no prompt ids: its attention_mask is all 0")
    return rows


def _refuse(names: Any) -> None:
    names = sorted(names)
    if names:
        raise ValueError(f"power sampling does not support {', '.join(names)}")


def _check_generation_config(config: Any) -> None:
    """A ValueError for what the generation config asks and power sampling cannot do."""
    asked = [name for name in NO_OUTPUTS if getattr(config, name, False)]
    asked += ["num_beams > 1"] if (config.num_beams or 1) > 1 else []
    asked += ["stop_strings"] if getattr(config, "stop_strings", None) else []
    asked += ["min_new_tokens"] if (config.min_new_tokens or 0) > 0 or (config.min_length or 0) > 0 else []
    _refuse(asked)


def _max_new_tokens(config: Any, width: int) -> int:
    """T: the generation config's max_new_tokens, else its max_length minus the prompts' width (as transformers)."""
    if config.max_new_tokens is not None:
        return config.max_new_tokens
    if config.max_length is None or config.max_length <= width:
        raise ValueError(f"max_length {config.max_length} leaves no room after {width} prompt ids: set max_new_tokens")
    return config.max_length - width


def _ids(eos: int | list[int] | torch.Tensor | None) -> list[int]:
    """The generation config's EOS ids as a list (none: sequences end at max_new_tokens only)."""
    if eos is None:
        return []
    if isinstance(eos, torch.Tensor):
        return [int(i) for i in eos.flatten().tolist()]
    return [int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _seed(seed: Any) -> int:
    """`power_seed`, or one drawn from torch's global generator (what `torch.manual_seed` sets)."""
    if seed is None:
        return int(torch.randint(0, 2**62, ()).item())
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"{SEED} must be an integer >= 0, got {seed!r}")
    return seed


def _padded(rows: list[tuple[int, ...]], pad: int, device: torch.device) -> torch.Tensor:
    """(len(rows), longest) LongTensor of the rows, each padded on the right with `pad`."""
    width = max(map(len, rows))
    return torch.tensor([list(r) + [pad] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
