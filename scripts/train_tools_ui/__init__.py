"""The Train Tools tab's pages (gradio); imported by scripts/train_tools.py."""
