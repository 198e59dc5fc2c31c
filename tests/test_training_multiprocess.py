"""A real two-process gloo run through `accelerate launch`: identical weights, different data, one writer."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest

# Runs on each rank: trains digits on a data set that records the indices it serves, and audits every file
# write under the output folder (Python's audit hooks see open/mkdir/rename/remove from any library).
DRIVER = textwrap.dedent(
    """
    import hashlib, json, os, sys
    import torch
    from ddpm_plugin.data import load_image_dataset
    from ddpm_plugin.training import TrainingConfig, train

    output = os.path.realpath(sys.argv[1])
    writes = []

    def audit(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1], args[2] if len(args) > 2 else 0
            writing = (mode is not None and any(c in mode for c in "wax+")) or (
                mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writing and os.path.realpath(os.fsdecode(args[0])).startswith(output):
                writes.append(os.fsdecode(args[0]))
        elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree"):
            if os.path.realpath(os.fsdecode(args[0])).startswith(output):
                writes.append(f"{event} {os.fsdecode(args[0])}")

    sys.addaudithook(audit)

    class RecordingDataset:
        def __init__(self, dataset):
            self.dataset, self.served = dataset, []
        def __len__(self):
            return len(self.dataset)
        def __getitem__(self, index):
            self.served.append(int(index))
            return self.dataset[index]

    data = RecordingDataset(load_image_dataset("digits", 8, 1))
    config = TrainingConfig(preset="digits", output_dir=output, max_steps=4, batch_size=16, checkpointing_steps=2,
                            log_every=1, log_with="tensorboard")
    result = train(config, dataset=data)

    def digest(module):
        return hashlib.sha256(b"".join(v.numpy().tobytes() for v in module.state_dict().values())).hexdigest()

    rank = int(os.environ.get("RANK", -1))
    report = {"rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", 1)), "unet": digest(result.unet),
              "ema": digest(result.ema_unet), "served": data.served, "writes": writes}
    print("RANK_REPORT " + json.dumps(report), flush=True)
    """
)


def launch_two_processes(launch: list[str], *script: str) -> subprocess.CompletedProcess:
    """`script` run by the `launch` command on two gloo CPU processes."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launch, *script], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_gloo_processes_share_weights_split_data_and_only_rank_0_writes(tmp_path, two_process_launch):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    output = tmp_path / "run"
    launch = launch_two_processes(two_process_launch, str(driver), str(output))
    assert launch.returncode == 0, launch.stderr[-4000:]

    reports = sorted((json.loads(line.split(" ", 1)[1]) for line in launch.stdout.splitlines()
                      if line.startswith("RANK_REPORT ")), key=lambda r: r["rank"])
    assert [r["rank"] for r in reports] == [0, 1] and {r["world_size"] for r in reports} == {2}
    assert "2 process(es)" in launch.stdout

    assert reports[0]["unet"] == reports[1]["unet"] and reports[0]["ema"] == reports[1]["ema"]
    served = [r["served"] for r in reports]
    assert len(served[0]) == len(served[1]) == 4 * 8  # 4 steps of 8 images per process
    assert not set(served[0]) & set(served[1]), "the two processes trained on the same images"

    assert reports[0]["writes"] and not reports[1]["writes"], reports[1]["writes"]
    assert (output / "pipeline" / "model_index.json").is_file()
    assert len(list((output / "checkpoints").iterdir())) == 2
    assert launch.stderr.count("| 0/4 [") == 1, "expected exactly one progress bar"


@pytest.mark.slow
def test_accelerate_launches_the_ddpm_train_command_on_two_processes(tmp_path, two_process_launch):
    output = tmp_path / "run"
    launch = launch_two_processes(two_process_launch, "-m", "ddpm_plugin.cli", "train", "--preset", "digits",
                                  "--batch-size", "16", "--max-steps", "2", "--log-with", "none",
                                  "--output-dir", str(output))
    assert launch.returncode == 0, launch.stderr[-4000:]
    assert "2 process(es)" in launch.stdout
    assert launch.stdout.count("trained 2 steps") == 1  # printed by the main process only
    assert (output / "pipeline" / "model_index.json").is_file()
