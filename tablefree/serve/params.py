"""What a request asks of the sampler: SamplingParams and their accepted ranges (no torch, so `--help` stays light)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Below this temperature sampling is greedy, as in vLLM: dividing logits by it would overflow float32.
GREEDY_BELOW_TEMPERATURE = 1e-5


class SamplingFieldError(ValueError):
    """A sampling field outside what the sampler's math accepts; names the field and what is accepted."""

    def __init__(self, name: str, value, accepted: str):
        super().__init__(f"{name}={value!r} is not accepted; give {accepted}")
        self.name, self.value, self.accepted = name, value, accepted


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # how many alternatives to report per token; None: no logprobs
    prompt_logprobs: bool = False  # echo + logprobs: score the prompt too
    skip_special_tokens: bool = True
    # logit_bias as (ids, values) tensors: built once by the sampler and shared by every sequence of these params
    logit_bias_tensors: tuple | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    def check(self) -> None:
        """Raises SamplingFieldError naming the first field outside what the sampler's math accepts."""
        ranges = [
            ("max_tokens", self.max_tokens >= 0, "an integer >= 0"),
            ("temperature", math.isfinite(self.temperature) and self.temperature >= 0, "a finite number >= 0"),
            ("top_p", 0 <= self.top_p <= 1, "a number in [0, 1]"),
            ("top_k", self.top_k >= -1, "-1 or 0 (off) or a positive integer"),
            ("min_p", 0 <= self.min_p <= 1, "a number in [0, 1]"),
            ("presence_penalty", math.isfinite(self.presence_penalty), "a finite number"),
            ("frequency_penalty", math.isfinite(self.frequency_penalty), "a finite number"),
            ("repetition_penalty", math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
             "a finite number > 0"),
            ("logit_bias", all(math.isfinite(b) for b in self.logit_bias.values()), "finite biases"),
            ("logprobs", self.logprobs is None or self.logprobs >= 0, "None or an integer >= 0"),
        ]
        for name, ok, accepted in ranges:
            if not ok:
                raise SamplingFieldError(name, getattr(self, name), accepted)

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0 or self.logit_bias)
