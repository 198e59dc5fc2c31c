"""Builds a bundled model folder (`ddpm_plugin/bundled/<name>/`) from a training run's checkpoint.

The EMA weights of the checkpoint become the pipeline's UNet, stored as float16 safetensors (half the download;
diffusers loads them as float32, and the ONNX export is made from these very weights, so the two agree); the
pipeline's own files go beside them (as `save_pretrained` writes them, so the folder loads every way a saved one
does), the validated ONNX export in `onnx/`, the run's settings in `training_config.json` and what the run took in
`training_run.json`. Other files already in the folder are kept.

    python scripts/bundle_model.py --run runs/mnist --name ddpm-mnist [--checkpoint runs/mnist/checkpoints/checkpoint-00007000]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from ddpm_plugin import DDPMPaperPipeline, PaperUNet2DModel, paper_scheduler
from ddpm_plugin.checkpoints import load_checkpoint, load_latest_checkpoint, match_json_permissions
from ddpm_plugin.export.onnx_export import export_onnx
from ddpm_plugin.trust import write_json
from ddpm_plugin.vocabulary import ONNX_SUBFOLDER, TRAINING_CONFIG_FILE, TRAINING_RUN_FILE

BUNDLED = Path(__file__).resolve().parent.parent / "ddpm_plugin" / "bundled"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="the `ddpm train` output folder")
    parser.add_argument("--name", required=True, help="folder name under ddpm_plugin/bundled/")
    parser.add_argument("--checkpoint", help="checkpoint folder (default: the run's latest)")
    parser.add_argument("--wall-minutes", type=float, help="the run's wall time, recorded in training_run.json")
    parser.add_argument("--command", help="the exact training command, recorded in training_run.json")
    args = parser.parse_args()

    run = Path(args.run)
    checkpoint = load_checkpoint(args.checkpoint) if args.checkpoint else load_latest_checkpoint(run / "checkpoints")
    config = checkpoint.trainer_state["config"]
    unet = PaperUNet2DModel.from_preset(config["preset"], dropout=config["dropout"])
    unet.load_state_dict(checkpoint.ema)
    unet = unet.half().eval()  # float16 on disk; loaded as float32, the export is made from these very weights

    target = BUNDLED / args.name
    for regenerated in ("unet", "scheduler", ONNX_SUBFOLDER):  # written anew below; anything else stays
        shutil.rmtree(target / regenerated, ignore_errors=True)
    pipe = DDPMPaperPipeline(unet=unet, scheduler=paper_scheduler(config["preset"]))
    pipe.save_pretrained(target)
    match_json_permissions(target)
    write_json(target / TRAINING_CONFIG_FILE, {**config, "output_dir": str(run)})
    summary = {"step": checkpoint.step, "checkpoint": checkpoint.path.name, "images_seen": checkpoint.step * config["batch_size"],
               "wall_minutes": args.wall_minutes, "command": args.command}
    write_json(target / TRAINING_RUN_FILE, summary)
    report = export_onnx(target, target / "onnx", seed=0)
    print(f"{target}: step {checkpoint.step}, ONNX max abs error {report.max_abs_error:.2e}, "
          f"{sum(p.stat().st_size for p in target.rglob('*') if p.is_file()) / 2**20:.1f} MB")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
