"""What an embedding model offers the training objective, declared (timm's feature info, in small).

The objective reads this declaration, never the model's methods: which named features
``forward_features`` returns and how wide each is, whether they come per frame
(a video model, (B, T, dim)), and whether the model adds a training term of its own
(``frame_loss``). :func:`softmine.engine.objective.check_contract` holds it against
what the loss declares it needs (:class:`softmine.losses.MetricLoss`) once per run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class FeatureInfo:
    """Named features of a model and how it hands them out.

    Args:
        name: the backbone's short name, for messages (``backbone.name``).
        features: feature name -> width, e.g. ``{"embedding": 512, "trunk": 2048}``.
        per_frame: ``forward_features(clips, labels)`` gives every feature per frame as
            (B, T, dim), plus the pooled ``tracklet`` (B, dim): a video model.
        frame_loss: the model has a training term of its own,
            ``frame_loss(details, labels)``, which the objective adds to the loss.
    """

    name: str
    features: Mapping[str, int] = field(default_factory=dict)
    per_frame: bool = False
    frame_loss: bool = False

    def describe(self) -> str:
        """``embedding (512), trunk (2048)``: the features and their widths, for messages."""
        if not self.features:
            return "no named features (only its output)"
        return ", ".join(f"{k} ({w})" for k, w in sorted(self.features.items()))
