"""The original ControlNet Gradio apps on Gradio 6: one small file per app (a ControlApp or the annotator tabs,
app_spec.py) over the app builder's parts, each readable on its own: loading.py (the model, control files and
detectors), handling.py (a request), page.py (the page), serving.py (the command line and server), with
parameters.py (the A1111 parameters in the PNGs), preprocessors.py and messages.py.

Run an app from the repository root, e.g. `python gradio_apps/gradio_canny2image.py --help`.
"""
