"""When to draft, and how many tokens: the worker's speculative policy.

`mode = "on"` always drafts `num_draft_tokens`; `"off"` never does; `"auto"` adapts:
- the rolling acceptance (draft tokens the target accepted / drafted, over the
  last rounds) below `LOWER_BELOW` lowers `num_draft` by one, above `RAISE_ABOVE`
  raises it back towards the preset's value;
- acceptance below `OFF_BELOW`, or drafting measured slower than plain decoding
  on this machine, stops drafting; it probes again after `probe_interval`
  (doubling, up to `MAX_PROBE_INTERVAL`, while probes keep losing).

Pure bookkeeping: times are passed in, so it is tested without a model.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..io.protocol import SpecStatus

LOWER_BELOW = 0.5
RAISE_ABOVE = 0.8
OFF_BELOW = 0.25
WINDOW_ROUNDS = 32
# Evidence before a decision: drafted tokens for acceptance, decoded tokens for speed.
MIN_DRAFTED = 24
MIN_TOKENS = 12
DECAY_AFTER = 512
FIRST_PROBE_INTERVAL = 60.0
MAX_PROBE_INTERVAL = 900.0


@dataclass
class Rate:
    """Decode tokens per second over what was measured (tokens / seconds)."""

    tokens: int = 0
    seconds: float = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds
        if self.tokens > DECAY_AFTER:  # recent figures weigh more than old ones
            self.tokens //= 2
            self.seconds /= 2

    @property
    def per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class DraftController:
    draft: str
    mode: str  # "auto" | "on" | "off"
    max_draft: int
    # Set when the pair cannot draft at all (tokenizer, cache, family policy).
    unsupported: str | None = None
    num_draft: int = 0
    active: bool = False
    reason: str = ""
    drafted_total: int = 0
    accepted_total: int = 0
    transitions: dict[str, int] = field(default_factory=lambda: {"lowered": 0, "raised": 0, "off": 0, "on": 0})
    lane_switches: dict[str, int] = field(default_factory=lambda: {"batch": 0, "speculative": 0})
    counting: bool = False  # not during warm-up
    probe_interval: float = FIRST_PROBE_INTERVAL
    probe_at: float | None = None
    _window: deque[tuple[int, int]] = field(default_factory=lambda: deque(maxlen=WINDOW_ROUNDS))
    spec: Rate = field(default_factory=Rate)
    plain: Rate = field(default_factory=Rate)

    def __post_init__(self) -> None:
        self.num_draft = self.max_draft
        if self.mode == "off" and not self.unsupported:
            self.unsupported = 'mode = "off": the draft is not loaded'
        if self.unsupported:
            self.reason = self.unsupported
        else:
            self.active = True
            self.reason = 'mode = "on"' if self.mode == "on" else "drafting (auto)"

    @property
    def available(self) -> bool:
        """Whether the draft can run at all (a benchmark may force it)."""
        return self.unsupported is None

    def use_draft(self, forced: bool | None, now: float) -> bool:
        """Whether a sequence that is alone now decodes speculatively."""
        if not self.available:
            return False
        if forced is not None:
            return forced
        if not self.active and self.mode == "auto" and self.probe_at is not None and now >= self.probe_at:
            self._turn_on("probing again", now)
        return self.active

    @property
    def acceptance(self) -> float:
        # A copy first (one C call, atomic under the GIL): the stats thread reads
        # this while the engine thread appends.
        window = tuple(self._window)
        drafted = sum(d for d, _ in window)
        return sum(a for _, a in window) / drafted if drafted else 0.0

    def on_round(self, drafted: int, accepted: int, tokens: int, seconds: float, now: float) -> None:
        if self.counting:
            self.drafted_total += drafted
            self.accepted_total += accepted
        self._window.append((drafted, accepted))
        self.spec.add(tokens, seconds)
        self._decide(now)

    def on_plain(self, tokens: int, seconds: float, now: float) -> None:
        self.plain.add(tokens, seconds)
        self._decide(now)

    def _decide(self, now: float) -> None:
        if self.mode != "auto" or not self.active:
            return
        spec, plain = self.spec.per_second, self.plain.per_second
        if self.spec.tokens >= MIN_TOKENS and self.plain.tokens >= MIN_TOKENS and spec < plain:
            self._turn_off(f"drafting measured slower: {spec:.1f} tok/s against {plain:.1f} plain", now)
            return
        if sum(d for d, _ in self._window) < MIN_DRAFTED:
            return
        rate = self.acceptance
        if rate < OFF_BELOW:
            self._turn_off(f"acceptance {rate:.2f} is below {OFF_BELOW}", now)
        elif rate < LOWER_BELOW and self.num_draft > 1:
            self.num_draft -= 1
            self.transitions["lowered"] += 1
            self.reason = f"acceptance {rate:.2f}: drafting {self.num_draft} tokens"
            self._window.clear()
        elif rate > RAISE_ABOVE and self.num_draft < self.max_draft:
            self.num_draft += 1
            self.transitions["raised"] += 1
            self.reason = f"acceptance {rate:.2f}: drafting {self.num_draft} tokens"
            self._window.clear()
        elif self.probe_at is not None and self.spec.tokens >= MIN_TOKENS:
            # A probe that holds up: the next loss waits the first interval again.
            self.probe_at = None
            self.probe_interval = FIRST_PROBE_INTERVAL

    def _turn_off(self, reason: str, now: float) -> None:
        if self.probe_at is not None:  # a probe lost again: wait longer next time
            self.probe_interval = min(self.probe_interval * 2, MAX_PROBE_INTERVAL)
        self.active = False
        self.reason = f"{reason}; probing again in {self.probe_interval:.0f}s"
        self.probe_at = now + self.probe_interval
        self.transitions["off"] += 1

    def _turn_on(self, reason: str, now: float) -> None:
        self.active = True
        self.reason = reason
        self.num_draft = self.max_draft
        self._window.clear()
        self.spec = Rate()  # judge the probe on fresh figures
        self.transitions["on"] += 1
        self.probe_at = now  # marks "probing" until the probe holds up

    def start_counting(self) -> None:
        """Warm-up is over: counters start with the first request (the daemon
        exports them as monotonic counters). Measured rates and the decision the
        calibration led to stay."""
        self.counting = True
        self._window.clear()

    def switched(self, to: str) -> None:
        """A sequence in flight moved lanes: to "batch" or to "speculative"."""
        if self.counting:
            self.lane_switches[to] += 1

    def status(self) -> SpecStatus:
        """The Stats/Ready frames' `speculative` object."""
        return {
            "draft": self.draft,
            "mode": self.mode,
            "active": self.active,
            "reason": self.reason,
            "num_draft_tokens": self.num_draft if self.active else 0,
            "acceptance": round(self.acceptance, 4),
            "drafted_total": self.drafted_total,
            "accepted_total": self.accepted_total,
            "spec_tps": round(self.spec.per_second, 3),
            "plain_tps": round(self.plain.per_second, 3),
            "lowered_total": self.transitions["lowered"],
            "raised_total": self.transitions["raised"],
            "off_total": self.transitions["off"],
            "on_total": self.transitions["on"],
            "to_batch_total": self.lane_switches["batch"],
            "to_speculative_total": self.lane_switches["speculative"],
        }
