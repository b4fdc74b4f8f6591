"""mlx-lm's decode batch with its rows' logits processors run for the whole batch.

mlx-lm's `GenerationBatch._step` calls each row's processors in turn: each reads
its row's last token with its own sync (`context[-1].item()`), fills its mask and
masks its row, all before the step's forward pass is launched, so the device waits
while the host works row by row (on an H200, eight json_schema streams lost 23% of
their aggregate; docs/design/PERFORMANCE.md). Here a step with processors:

1. builds the forward pass and starts it (`mx.async_eval`);
2. reads every row's last token at once and brings each row's consumers up to
   date (`LaneProcessor.advance`);
3. fills all rows' masks together while the pass runs (requests/constraint.py
   `step_masks`: llguidance's parallel fill where there are cores to spare);
4. masks the batch's logits in one op; mlx-lm's own step then samples and
   pipelines as it does for unconstrained rows.

It does so by standing in for the model during mlx-lm's step (the step calls
`self.model(inputs[:, None], cache=...)`), with the rows' processors hidden from
mlx-lm's per-row loop for that call. A sequence's first token is still sampled
in the small batch mlx-lm builds for it at the end of its prefill, through the
processors' per-row call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from mlx_lm.generate import GenerationBatch

from ..requests.constraint import LaneProcessor, mask_logits

if TYPE_CHECKING:
    import mlx.core as mx


class MaskedGenerationBatch(GenerationBatch):
    """The BatchGenerator's decode batch (backend.py installs it). Rows whose
    processors are not all `LaneProcessor`s send the step back to mlx-lm's own
    loop; ours never need mlx-lm's per-row token context (`_token_context`), which
    these steps leave behind."""

    def _step(self) -> Any:
        processors = self.logits_processors
        lanes: list[list[LaneProcessor]] = []
        for row in processors or ():
            ours = [p for p in row or () if isinstance(p, LaneProcessor)]
            if len(ours) < len(row or ()):
                return super()._step()  # not ours: mlx-lm's way
            lanes.append(ours)
        if not any(lanes):
            return super()._step()
        model = self.model

        def masked_forward(inputs: mx.array, cache: Any) -> mx.array:
            import mlx.core as mx

            logits = model(inputs, cache=cache)
            mx.async_eval(logits)  # the pass runs while the host fills the masks
            for row, token in zip(lanes, cast("list[int]", inputs.reshape(-1).tolist())):
                for lane in row:
                    lane.advance(token)
            last = mask_logits([[lane.consumer for lane in row] for row in lanes], logits[:, -1, :])
            return last[:, None, :]

        self.model, self.logits_processors = masked_forward, [[] for _ in lanes]
        try:
            return super()._step()
        finally:
            self.model, self.logits_processors = model, processors
