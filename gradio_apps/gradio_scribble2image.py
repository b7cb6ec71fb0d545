"""Control Stable Diffusion with scribbles, dark lines on light paper (models/control_sd15_scribble.pth)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, when run as a script

from gradio_apps.app_spec import ControlApp  # noqa: E402
from gradio_apps.serving import main  # noqa: E402

APP = ControlApp("Control Stable Diffusion with Scribble Maps", "control_sd15_scribble.pth", "scribble")

if __name__ == "__main__":
    sys.exit(main(APP))
