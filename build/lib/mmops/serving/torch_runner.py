"""The torch backend: the saved torch model run on a collated batch (needs the training install)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mmops.model.preprocess import MODEL_INPUTS
from mmops.model.storage import LoadedModel
from mmops.serving.runners import Outputs


class TorchRunner:
    """Runs the torch model on a collated batch."""

    name = "torch"

    def __init__(self, loaded: LoadedModel) -> None:
        self.model = loaded.model.eval()
        self.device = next(self.model.parameters()).device

    @torch.no_grad()
    def __call__(self, batch: Mapping[str, Any]) -> Outputs:
        # numpy arrays from the serving collator, tensors from training's: the same values
        inputs = {k: torch.as_tensor(batch[k]).to(self.device) for k in MODEL_INPUTS}
        output = self.model(**inputs)
        named = output.embeddings()
        return Outputs(
            output.logits.float().softmax(-1).cpu().numpy(),
            {name: value.float().cpu().numpy() for name, value in named.items()},
        )
