"""The task types a backbone is fine-tuned for (``model.task_type``)."""

from __future__ import annotations

from typing import Final

SEQ_CLS: Final = "seq-cls"
"""A sequence classifier: a new head on the backbone, cross-entropy on its logits."""
CAUSAL_LM: Final = "causal-lm"
"""Instruction tuning of a decoder: chat turns, next-token loss on the answer tokens."""
TASK_TYPES: Final[tuple[str, ...]] = (SEQ_CLS, CAUSAL_LM)

SYSTEM_TEMPLATE: Final = "template"
"""``data.system_prompt``: the data's own system turns, and where there are none whatever the
chat template adds by itself (SmolLM2's adds its default system prompt; most add nothing)."""
SYSTEM_NONE: Final = "none"
"""``data.system_prompt``: no system prompt (an empty system turn where the template would add
its default, so it does not)."""
