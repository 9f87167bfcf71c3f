"""Run by the WebUI (as a subprocess, at every start) to install what the extension needs.

Idempotent, and it never installs or upgrades anything the WebUI pins (torch, transformers, gradio,
numpy, safetensors, ...): the engine uses those as the WebUI has them.
"""

import sys

import launch

# The engine reads TOML settings with tomllib, which Python has from 3.11; the WebUI's tested Python is 3.10.
if sys.version_info < (3, 11) and not launch.is_installed("tomli"):
    launch.run_pip("install tomli", "tomli for Train Tools")
