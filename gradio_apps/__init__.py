"""The original ControlNet Gradio apps on Gradio 6: one small file per app over `app_builder`.

Run an app from the repository root, e.g. `python gradio_apps/gradio_canny2image.py --help`.
"""
