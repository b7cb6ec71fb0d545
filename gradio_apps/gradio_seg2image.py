"""Control Stable Diffusion with ADE20K segmentation maps (UniFormer) (models/control_sd15_seg.pth)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, when run as a script

from gradio_apps.app_spec import ControlApp  # noqa: E402
from gradio_apps.serving import main  # noqa: E402

APP = ControlApp("Control Stable Diffusion with Segmentation Maps", "control_sd15_seg.pth", "seg")

if __name__ == "__main__":
    sys.exit(main(APP))
