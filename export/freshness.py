"""Whether an ONNX export still matches the weights of the pipeline folder it was exported from.

`export_onnx` records the sha256 of `unet/diffusion_pytorch_model.safetensors` in `ddpm_onnx.json`; a folder
retrained or resumed after its export holds other weights, and its `onnx/` export would silently sample another
model. Torch-free: `OnnxDDPMPipeline` checks this on load.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ddpm_plugin.trust import file_sha256

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


class StaleExportError(ValueError):
    """The export was made from other weights than its pipeline folder holds now."""



def source_weights(export_dir: Path, metadata: dict[str, Any]) -> Path | None:
    """The UNet weights of the pipeline folder the export names as its source, when that folder is here."""
    source = metadata.get("source_model")
    if not isinstance(source, str):
        return None
    folder = Path(source) if os.path.isabs(source) else export_dir / source
    weights = folder / "unet" / WEIGHTS_NAME
    return weights if weights.is_file() else None


def check_export_fresh(export_dir: str | os.PathLike, metadata: dict[str, Any]) -> None:
    """Raise `StaleExportError` when the source pipeline's weights are present and differ from the ones exported.

    An export whose source folder is elsewhere (copied alone, downloaded from the Hub) cannot be checked and passes;
    so does one written before the hash was recorded.
    """
    export_dir = Path(export_dir)
    recorded = metadata.get("source_weights_sha256")
    weights = source_weights(export_dir, metadata)
    if recorded is None or weights is None:
        return
    if file_sha256(weights) != recorded:
        raise StaleExportError(
            f"the ONNX export in {export_dir} was made from other weights than {weights} holds now (the model was "
            f"retrained after the export); re-export it: ddpm export --model {weights.parent.parent} --output {export_dir}"
        )
