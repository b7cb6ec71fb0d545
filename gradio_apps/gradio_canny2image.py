"""Control Stable Diffusion with Canny edge maps (models/control_sd15_canny.pth)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, when run as a script

from gradio_apps.app_spec import ControlApp  # noqa: E402
from gradio_apps.serving import main  # noqa: E402

APP = ControlApp("Control Stable Diffusion with Canny Edge Maps", "control_sd15_canny.pth", "canny")

if __name__ == "__main__":
    sys.exit(main(APP))
