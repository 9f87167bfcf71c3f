"""Train Tools engine: LoRA training on a Stable Diffusion model that a host already loaded.

Nothing in this package imports gradio or any WebUI module; the WebUI glue lives in ``scripts/``.
"""
