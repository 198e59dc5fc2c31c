#!/usr/bin/env bash
# Runs diffusers' own pipeline tests against DDPMPaperPipeline: `PipelineTesterMixin` (its
# tests/pipelines/test_pipelines_common.py) with a small UNet2DModel and DDPMScheduler, as diffusers'
# tests/pipelines/ddim/test_ddim.py does, and tests/pipelines/ddpm/test_ddpm.py with DDPMPipeline swapped for
# DDPMPaperPipeline. Fetches nothing and leaves the checkout untouched: its tests/ are copied to a temporary folder.
#
#   scripts/diffusers_conformance.sh PATH/TO/DIFFUSERS-CHECKOUT [pytest arguments]
#
# Needs the test-only imports of those files in the environment: pip install transformers parameterized requests-mock
set -euo pipefail

if [ $# -lt 1 ] || [ ! -f "$1/tests/pipelines/test_pipelines_common.py" ] || [ ! -f "$1/tests/pipelines/ddpm/test_ddpm.py" ]; then
  echo "usage: $0 PATH/TO/DIFFUSERS-CHECKOUT [pytest arguments] (a checkout with tests/pipelines/)" >&2
  exit 2
fi
checkout=$(cd "$1" && pwd)
shift
python=${PYTHON:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Only tests/: diffusers' tests/conftest.py puts ../src first on sys.path, and the installed diffusers is the one
# under test.
cp -r "$checkout/tests" "$work/tests"
suite="$work/tests/pipelines/ddpm_paper"
mkdir "$suite"
touch "$suite/__init__.py"

cat > "$suite/test_ddpm_paper_pipeline.py" <<'EOF'
import unittest

import torch
from diffusers import DDPMScheduler, UNet2DModel

from ddpm_plugin import DDPMPaperPipeline

from ...testing_utils import enable_full_determinism
from ..pipeline_params import UNCONDITIONAL_IMAGE_GENERATION_BATCH_PARAMS, UNCONDITIONAL_IMAGE_GENERATION_PARAMS
from ..test_pipelines_common import PipelineTesterMixin

enable_full_determinism()


class DDPMPaperPipelineFastTests(PipelineTesterMixin, unittest.TestCase):
    pipeline_class = DDPMPaperPipeline
    params = UNCONDITIONAL_IMAGE_GENERATION_PARAMS
    # Unconditional pipelines have no prompt to repeat; `latents` stays required, since this pipeline takes it.
    required_optional_params = PipelineTesterMixin.required_optional_params - {"num_images_per_prompt"}
    batch_params = UNCONDITIONAL_IMAGE_GENERATION_BATCH_PARAMS

    def get_dummy_components(self):
        torch.manual_seed(0)
        unet = UNet2DModel(
            block_out_channels=(4, 8),
            layers_per_block=1,
            norm_num_groups=4,
            sample_size=8,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        )
        return {"unet": unet, "scheduler": DDPMScheduler()}

    def get_dummy_inputs(self, device, seed=0):
        generator = torch.Generator(device="cpu").manual_seed(seed)
        return {"batch_size": 1, "generator": generator, "num_inference_steps": 2, "output_type": "np"}
EOF

stock_import="from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel"
if ! grep -qx "$stock_import" "$checkout/tests/pipelines/ddpm/test_ddpm.py"; then
  echo "test_ddpm.py no longer imports '$stock_import': update the class swap in $0" >&2
  exit 2
fi
sed "s/^$stock_import\$/from diffusers import DDPMScheduler, UNet2DModel\nfrom ddpm_plugin import DDPMPaperPipeline as DDPMPipeline/" \
  "$checkout/tests/pipelines/ddpm/test_ddpm.py" > "$suite/test_ddpm_swapped.py"

cd "$work"
"$python" -m pytest -p no:cacheprovider -q -rsfE "$@" tests/pipelines/ddpm_paper
