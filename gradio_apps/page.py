"""Page layout of the apps on Gradio 6: what a diffusion app and the annotator app show, and how their inputs reach
the request handler (gradio_apps/handling.py).

The page offers what users of the A1111 extension and ComfyUI expect: a sampler and its steps, and up to three
control units (multi-ControlNet), each with its own control file (the model's own, or a ControlNet, control-LoRA
or LLLite file from --control-dir), picture, preprocessor, strength, start/end window and control mode.

Inputs reach the handler unprocessed (preprocess=False): Gradio's own checks refuse a value without naming the
setting or its unit (and check a list refreshed on the page against a stale copy of its choices), so the handler
checks every value by name; here only pictures are decoded, a broken upload named by the user's own file name.
"""

from collections.abc import Callable, Sequence
from typing import Any

import gradio as gr
import numpy as np
import PIL.Image
import torch

from cldm.controlnet_union import CONTROL_TYPES
from gradio_apps.app_spec import AnnotatorTab, ControlApp
from gradio_apps.handling import (
    AUTO_TYPE,
    CONTROL_MODES,
    DENOISING,
    ENABLE,
    END,
    ETA,
    GUIDANCE,
    IMAGES,
    MAX_UNITS,
    SEED,
    START,
    STEPS,
    STRENGTH,
    Pipeline,
    SizeRequest,
    annotate_fn,
    native_resolution,
    resolution_slider,
)
from gradio_apps.loading import OWN, ControlFiles, Detectors
from gradio_apps.messages import user_error
from gradio_apps.preprocessors import PREPROCESSORS, Slider
from ldm.models.diffusion.samplers import SAMPLERS

A_PROMPT = "best quality, extremely detailed"
N_PROMPT = ("longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, cropped, "
            "worst quality, low quality")
PICTURE_ERRORS = (OSError, ValueError, PIL.Image.DecompressionBombError)  # unreadable, broken or huge uploads


def image_input(label: str = "Input image") -> gr.Image:
    # RGBA keeps transparency for HWC3 to put on white; grayscale and palette pictures arrive as RGBA too
    return gr.Image(label=label, sources=["upload", "clipboard"], type="numpy", image_mode="RGBA")


def read_picture(component: gr.Image | gr.ImageEditor, name: str, payload: dict | None) -> Any:
    """A picture input's payload as its component decodes it; an unreadable upload (a text file, a broken picture)
    is refused naming the input and the user's own file name, never the server's temporary path."""
    if payload is None:
        return None
    try:
        return component.preprocess(component.data_model.model_validate(payload))
    except PICTURE_ERRORS as err:
        shown = payload.get("orig_name") or "the upload"
        reason = "not a picture" if isinstance(err, PIL.UnidentifiedImageError) else str(err)
        for path in {v for v in payload.values() if isinstance(v, str) and "/" in v}:  # path and url
            reason = reason.replace(path, shown)
        raise user_error(f"{name}: could not read {shown} as an image ({reason}). Use a PNG, JPEG or WebP picture.",
                         "Not an image") from err


def read_pictures(payloads: dict[str, Any], pictures: dict[str, tuple[gr.components.Component, str]]
                  ) -> dict[str, Any]:
    """The payloads with every picture input's decoded; `pictures`: key -> (component, the name messages use)."""
    return payloads | {key: read_picture(component, name, payloads.get(key))
                       for key, (component, name) in pictures.items()}


def gallery() -> gr.Gallery:
    # PNG: line maps stay exact (WebP would smear them), and the images' parameters travel in their text chunk
    return gr.Gallery(label="Output", show_label=False, elem_id="gallery", columns=2, height="auto",
                      format="png")


def canvas_size(model: torch.nn.Module) -> tuple[int, int]:
    """(canvas side, brush size) for drawing a scribble: 512 and 6 px for SD; 4x a small model's resolution,
    with a brush that stays about 1.5 px wide once the drawing is shrunk to it."""
    native = native_resolution(model)
    side = min(512, max(256, 4 * native))
    return side, max(6, round(1.5 * side / native))


def new_canvas(width: int, height: int) -> np.ndarray:
    return np.full((int(height), int(width), 3), 255, dtype=np.uint8)


def sketch_input(model: torch.nn.Module) -> gr.Sketchpad:
    """Canvas size sliders, a button that opens a fresh white canvas, and the canvas itself, sized for the
    model (see canvas_size)."""
    side, brush = canvas_size(model)
    canvas_width = Slider("canvas_width", "Canvas Width", 64, 1024, side, 1).make()
    canvas_height = Slider("canvas_height", "Canvas Height", 64, 1024, side, 1).make()
    create_button = gr.Button("Open drawing canvas!")
    canvas = gr.Sketchpad(label="Scribble", type="numpy", image_mode="RGBA", canvas_size=(side, side),
                          brush=gr.Brush(default_size=brush, default_color="#000000", colors=["#000000"]),
                          elem_id="scribble")
    create_button.click(new_canvas, inputs=[canvas_width, canvas_height], outputs=[canvas],
                        api_name="new_canvas")
    return canvas


def unit_controls(index: int, app: ControlApp, control_files: ControlFiles) -> dict[str, gr.components.Component]:
    """One control unit's settings as the A1111 extension shows them, by input name (unit<k>_<field>)."""
    name = f"unit{index}_"
    controls: dict[str, gr.components.Component] = {
        name + "enabled": ENABLE.make(value=index == 1, elem_id=f"{name}enabled")}
    if index > 1:
        controls[name + "image"] = image_input(f"Control image of unit {index} (empty: the input image above)")
    with gr.Row():
        control_file = controls[name + "control_file"] = gr.Dropdown(
            label="Model (control file)", choices=control_files.choices(), value=OWN, scale=4,
            info=f"the loaded model's own network, or a file in {control_files.shown_folder()}")
        refresh = gr.Button("↻", size="sm", scale=0, min_width=40, elem_id=f"{name}refresh")
        preprocessor = controls[name + "preprocessor"] = gr.Dropdown(
            label="Preprocessor", choices=[(p.label, p.name) for p in PREPROCESSORS.values()],
            value=app.preprocessor if index == 1 else "none", scale=4)
    groups = []
    for p in PREPROCESSORS.values():
        if not p.settings:
            continue
        with gr.Group(visible=p.name == preprocessor.value) as group:
            for option in p.settings:
                controls[f"{name}{p.name}__{option.name}"] = option.make()
        groups.append((p.name, group))
    # files put into the folder after the page was built become choices (Gradio accepts only listed ones)
    refresh.click(lambda: gr.Dropdown(choices=control_files.choices()), outputs=[control_file],
                  api_name=f"refresh_unit{index}", api_visibility="undocumented")
    preprocessor.change(lambda chosen: [gr.Group(visible=chosen == n) for n, _ in groups], inputs=[preprocessor],
                        outputs=[g for _, g in groups], api_visibility="private")
    # a ControlNet-Union file (or model) names what its hint shows: shown for such a choice only
    control_type = controls[name + "control_type"] = gr.Dropdown(
        label="Control Type", choices=[("auto: the preprocessor's", AUTO_TYPE), *((t, t) for t in CONTROL_TYPES)],
        value=AUTO_TYPE, visible=bool(control_files.control_types(OWN)),
        info="what the control image shows, for a ControlNet-Union (units on one union file are fused in one pass)")
    control_file.change(lambda chosen: gr.Dropdown(visible=bool(control_files.control_types(chosen))),
                        inputs=[control_file], outputs=[control_type], api_visibility="private")
    controls[name + "strength"] = STRENGTH.make()
    with gr.Row():
        controls[name + "start"] = START.make()
        controls[name + "end"] = END.make()
    controls[name + "mode"] = gr.Radio(label="Control Mode", choices=list(CONTROL_MODES.items()), value="balanced")
    return controls


def size_controls() -> dict[str, gr.components.Component]:
    """SDXL's size conditioning (0: the default, the image's size and no crop; the negative ones: as above)."""
    controls = {}
    with gr.Accordion("SDXL size conditioning (0: the image's size, no crop)", open=False):
        for negative in (False, True):
            with gr.Row():
                controls |= {s.name: s.make() for s in SizeRequest.sliders(negative)}
    return controls


def sampler_settings(name: str) -> tuple[gr.Slider, gr.Slider]:
    """A sampler's default steps; eta only for DDIM (0 for the others, which have none)."""
    ddim = name == "ddim"
    return gr.Slider(value=SAMPLERS[name].default_steps), gr.Slider(value=0.0, interactive=ddim)


def build_demo(app: ControlApp, pipeline: Pipeline, guidance_scale: float = GUIDANCE.value) -> gr.Blocks:
    """Input, prompt and Run; sampler and steps; a tab per control unit; more options folded; gallery on the right.
    `guidance_scale`: the Guidance Scale it starts with (9, as the original apps)."""
    with gr.Blocks(title=app.title, analytics_enabled=False) as demo:
        gr.Markdown(f"## {app.title}")
        with gr.Row():
            with gr.Column():
                input_image = sketch_input(pipeline.model) if app.sketch else image_input()
                with gr.Accordion("img2img: initial image (optional)", open=False):
                    init_image = image_input("Initial image (empty: start from noise)")
                    denoising_strength = DENOISING.make()
                prompt = gr.Textbox(label="Prompt", elem_id="prompt")
                run_button = gr.Button("Run", variant="primary", elem_id="run")
                with gr.Row():
                    sampler = gr.Dropdown(label="Sampler", choices=[(s.label, s.name) for s in SAMPLERS.values()],
                                          value="ddim")
                    steps = STEPS.make()
                controls: dict[str, gr.components.Component] = {}
                with gr.Tabs():
                    for index in range(1, MAX_UNITS + 1):
                        with gr.Tab(f"ControlNet Unit {index}"):
                            controls |= unit_controls(index, app, pipeline.control_files)
                with gr.Accordion("Advanced options", open=False):
                    num_samples = IMAGES.make()
                    image_resolution = resolution_slider(pipeline.model).make()
                    scale = GUIDANCE.make(value=guidance_scale)
                    seed = SEED.make(randomize=True)
                    eta = ETA.make()
                    a_prompt = gr.Textbox(label="Added Prompt", value=A_PROMPT)
                    n_prompt = gr.Textbox(label="Negative Prompt", value=N_PROMPT)
                if pipeline.model.vector_conditioned:
                    controls |= size_controls()
            with gr.Column():
                result_gallery = gallery()
        sampler.change(sampler_settings, inputs=[sampler], outputs=[steps, eta], api_visibility="private")
        inputs = dict(input_image=input_image, prompt=prompt, a_prompt=a_prompt, n_prompt=n_prompt,
                      num_samples=num_samples, image_resolution=image_resolution, sampler=sampler, steps=steps,
                      scale=scale, seed=seed, eta=eta, init_image=init_image,
                      denoising_strength=denoising_strength) | controls
        pictures = {"input_image": (input_image, "Scribble" if app.sketch else "Input image"),
                    "init_image": (init_image, "Initial image")}
        pictures |= {f"unit{k}_image": (controls[f"unit{k}_image"], f"Unit {k}: control image")
                     for k in range(2, MAX_UNITS + 1)}

        # the optional pictures named with a default: API clients may leave them out
        def run(progress: gr.Progress = gr.Progress(), unit2_image: dict | None = None,
                unit3_image: dict | None = None, init_image: dict | None = None, **payloads: Any) -> list:
            payloads |= {"unit2_image": unit2_image, "unit3_image": unit3_image, "init_image": init_image}
            return pipeline.process(progress=progress, **read_pictures(payloads, pictures))

        run_button.click(run, inputs_kwargs=inputs, outputs=[result_gallery], api_name="process", preprocess=False)
    return demo


def annotator_request(tab: AnnotatorTab, detectors: Detectors, picture: gr.Image
                      ) -> Callable[..., list[np.ndarray]]:
    """The event function of a tab's Run: its picture decoded, then annotate_fn."""
    annotate = annotate_fn(tab, detectors)

    def run(**payloads: Any) -> list[np.ndarray]:
        return annotate(**read_pictures(payloads, {"input_image": (picture, "Input image")}))

    return run


def build_annotator_demo(tabs: Sequence[AnnotatorTab], detectors: Detectors) -> gr.Blocks:
    """One tab per detector: picture, its settings and a resolution in, the detected maps out."""
    with gr.Blocks(title="ControlNet annotators", analytics_enabled=False) as demo:
        gr.Markdown("## ControlNet annotators")
        for tab in tabs:
            with gr.Tab(tab.title):
                with gr.Row():
                    with gr.Column():
                        input_image = image_input()
                        options = {option.name: option.make() for option in tab.options}
                        resolution = tab.resolution_slider.make()
                        run_button = gr.Button("Run", variant="primary")
                    with gr.Column():
                        result_gallery = gallery()
                inputs = dict(input_image=input_image, resolution=resolution) | options
                run_button.click(annotator_request(tab, detectors, input_image), inputs_kwargs=inputs,
                                 outputs=[result_gallery], api_name=tab.name, preprocess=False)
    return demo
