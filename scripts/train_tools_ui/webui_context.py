"""The WebUI objects Train Tools works with: its modules handed to the engine, and the one job runner."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from modules import (call_queue, devices, images, paths, processing, progress, sd_hijack, sd_models,
                     sd_samplers_common, sd_vae, shared)

from lib_train.webui.host import WebUI
from lib_train.webui.jobs import Folders, TrainingJobs
from lib_train.webui.path_policy import exposed_to_network

_jobs: TrainingJobs | None = None


def jobs() -> TrainingJobs:
    global _jobs
    if _jobs is None:
        cmd = shared.cmd_opts
        folders = Folders(
            lora_dir=Path(getattr(cmd, "lora_dir", None) or os.path.join(paths.models_path, "Lora")),
            projects_dir=Path(getattr(cmd, "train_tools_dir", None) or os.path.join(paths.data_path, "train_tools")),
            data_dir=Path(paths.data_path),
            exposed=exposed_to_network(cmd),  # --ngrok too, as the WebUI's own extension-access check
        )
        webui = WebUI(shared=shared, devices=devices, sd_hijack=sd_hijack, processing=processing,
                      sd_samplers_common=sd_samplers_common, call_queue=call_queue, progress=progress, sd_vae=sd_vae, sd_models=sd_models, images=images,
                      networks=sys.modules.get("networks") if hasattr(sys.modules.get("networks"), "load_network") else None)
        _jobs = TrainingJobs(webui, folders, verify_restore=shared.opts.data.get("train_tools_verify_restore", True))
    return _jobs
