"""Hugging Face Space entry point: the hf-m2n2 Gradio app (`hf_m2n2.app`, the same engine as the CLI)."""

from hf_m2n2.app import build_demo

# The tiny specialists (the offline demo seeds) are built in the background at start-up, once per container.
demo = build_demo(prebuild_specialists=True)

if __name__ == "__main__":
    demo.launch()
