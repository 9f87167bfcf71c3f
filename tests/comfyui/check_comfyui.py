"""Do Train Tools' files load in ComfyUI, every key matched and the right weight change? (Run by hand against a
ComfyUI checkout, not by CI: ComfyUI is not on the package index and CI has no network.)

    <comfy venv>/bin/python tests/comfyui/check_comfyui.py --comfyui ~/ComfyUI [--checkpoint sd.safetensors \
        --lora FILE ... | --train] [--sdxl [--sdxl-every 3] [--sdxl-checkpoint sdxl.safetensors]] [--strengths 1 0.5]

Two Python environments: ComfyUI's (this script, which imports ComfyUI from --comfyui) and the project's
(--project-python, default .venv/bin/python: it trains with ``python -m lib_train`` and computes Train Tools' own
ΔW through reference_deltas.py; the two never hold a model at the same time).

SD1.x and SD2.x (--checkpoint; tests/comfyui/random_sd2.py makes a random full-size SD2 when no real one is at
hand): ComfyUI loads the checkpoint (comfy.sd.load_checkpoint_guess_config, no VAE; a key it misses fails the
check), each file goes through
comfy.sd.load_lora_for_models (its log captured), then for each strength the model and CLIP ModelPatchers run
patch_model() on a part of the file's modules at a time (whole-file patching would hold a second copy of every
patched weight) and each patched weight minus the original is compared with strength × Train Tools' ΔW
(LoRANetwork.for_kohya_state_dict + each module's weight_delta()).

SDXL (--sdxl): no full SDXL is loaded (10 GB in float32). Full-size files are synthesised by the training code on
the project's SDXL built on the meta device; ComfyUI detects the model from the checkpoint's tensor shapes
(model_detection.model_config_from_unet) and builds its SDXL UNet and CLIP-L/G on the meta device; the key maps,
load_lora and add_patches are ComfyUI's own (load_lora_for_models' steps, which need a CLIP object), the shapes
are checked against ComfyUI's layers, and each weight change is comfy.lora.calculate_weight (what patch_model
runs per weight) on a stand-in base weight that both sides draw from the LoRA key.

Prints a table per file; exits non-zero when a key is not loaded, a count differs or a ΔW differs.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import logging
import math
import subprocess
import sys
import tempfile
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from delta_stream import read_records, stand_in_base_weight  # noqa: E402

CHUNK_BYTES = 256 * 2**20  # ΔW patched and compared at once (a loaded checkpoint): bounds the patched copies held
PROBLEMS = ("lora key not loaded", "NOT LOADED", "SHAPE MISMATCH", "Calculate Weight Failed", "ERROR")
LOAD_PROBLEMS = ("unet missing", "unet unexpected", "clip missing", "no CLIP", "ERROR")  # loading the checkpoint


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, required=True, help="a ComfyUI checkout")
    parser.add_argument("--checkpoint", type=Path, help="an SD1.x or SD2.x .safetensors checkpoint (for --lora, "
                        "--train)")
    parser.add_argument("--lora", type=Path, nargs="*", default=[], help="Train Tools files trained on --checkpoint")
    parser.add_argument("--train", action="store_true", help="train one tiny file per network type first "
                        "(2 generated pictures, 2 steps, rank 4) with the project's command line")
    parser.add_argument("--types", nargs="+", choices=list(NETWORK_TYPES), default=list(NETWORK_TYPES),
                        help="the network types --train and --sdxl make (default: all)")
    parser.add_argument("--sdxl", action="store_true", help="also check full-size SDXL files (no weights loaded)")
    parser.add_argument("--sdxl-checkpoint", type=Path, help="read ComfyUI's SDXL detection shapes from this file's "
                        "header (default: the project's SDXL tree)")
    parser.add_argument("--sdxl-every", type=int, default=1, help="compare the ΔW of every Nth SDXL module (keys, "
                        "counts and shapes are checked for all)")
    parser.add_argument("--project-python", type=Path, default=REPO / ".venv" / "bin" / "python")
    parser.add_argument("--work-dir", type=Path, help="keep trained files and ΔW here (default: a temporary folder)")
    parser.add_argument("--strengths", type=float, nargs="+", default=[1.0, 0.5])
    parser.add_argument("--tolerance", type=float, default=1e-5, help="largest |ΔW difference| accepted")
    args = parser.parse_args()
    if (args.lora or args.train) and args.checkpoint is None:
        parser.error("--lora and --train need the --checkpoint they were trained on")
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work_dir or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        files = list(args.lora) + (train_files(args.project_python, args.checkpoint, work, args.types)
                                   if args.train else [])
        if not files and not args.sdxl:
            parser.error("give --lora files, --train or --sdxl")
        stale = [path for path in files if not _fresh(work / f"{path.stem}.deltas", path)]
        if stale:
            run_project(args.project_python, "checkpoint", "--checkpoint", str(args.checkpoint), "--out", str(work),
                        *map(str, stale))
        sdxl_files = []
        if args.sdxl:
            sdxl_files = [work / f"sdxl-{name}.safetensors" for name in args.types]
            if not all(path.is_file() for path in [*sdxl_files, work / "sdxl-shapes.json"]):  # kept --work-dir
                run_project(args.project_python, "sdxl", "--out", str(work), *args.types)
        import_comfyui(args.comfyui)
        rows = []
        if files:
            rows += check_checkpoint(args.checkpoint, files, work, args.strengths)
        if sdxl_files:
            shapes = (header_shapes(args.sdxl_checkpoint) if args.sdxl_checkpoint
                      else json.loads((work / "sdxl-shapes.json").read_text()))
            rows += check_sdxl(sdxl_files, shapes, args.project_python, args.strengths, args.sdxl_every)
    return print_table(rows, args.strengths, args.tolerance)


# --- the project's side -------------------------------------------------------------------------------------

NETWORK_TYPES = {  # as reference_deltas.NETWORK_TYPES, in TOML
    "lora": 'network_type = "lora"\nconv_rank = 0\n',
    "locon": 'network_type = "locon"\nconv_rank = 4\nconv_alpha = 2.0\n',
    "loha": 'network_type = "loha"\nconv_rank = 4\nconv_alpha = 2.0\n',
    "lokr": 'network_type = "lokr"\nconv_rank = 4\nconv_alpha = 2.0\n',
    "dora": 'network_type = "lora"\nconv_rank = 4\nconv_alpha = 2.0\ndora = true\n',
}


def train_files(python: Path, checkpoint: Path, work: Path, types: list[str]) -> list[Path]:
    """One file per network type: two steps of AdamW at 1e-3 (UNet and text encoder), so every module, LoRA's
    zero-initialised up weights included, has moved off zero by training, not by a perturbation."""
    from PIL import Image, ImageDraw

    pictures = work / "pictures" / "1_ttcomfy"
    pictures.mkdir(parents=True, exist_ok=True)
    for index in range(2):
        image = Image.new("RGB", (256, 256), (40 * index, 80, 160))
        ImageDraw.Draw(image).ellipse((40 + 8 * index, 60, 200, 220), fill=(230, 40, 40))
        image.save(pictures / f"{index}.png")
        (pictures / f"{index}.txt").write_text(f"ttcomfy, red disc, picture {index}", encoding="utf-8")
    files = []
    for name in types:
        network = NETWORK_TYPES[name]
        config = work / f"{name}.toml"
        config.write_text(f'name = "tt-{name}"\ntrain_dir = "pictures"\noutput_dir = "out"\noverwrite = true\n'
                          "resolution = 256\nenable_buckets = false\nrank = 4\nalpha = 4.0\nepochs = 1\n"
                          "batch_size = 1\nunet_lr = 1e-3\ntext_encoder_lr = 1e-3\nlr_scheduler = \"constant\"\n"
                          f"gradient_checkpointing = true\nseed = 1\n{network}")
        print(f"training {name} ...", flush=True)
        subprocess.run([str(python), "-m", "lib_train", "train", "--config", str(config), "--checkpoint",
                        str(checkpoint)], cwd=REPO, check=True)
        files.append(work / "out" / f"tt-{name}.safetensors")
    return files


def _fresh(deltas: Path, source: Path) -> bool:
    """ΔW already computed (a kept --work-dir) for this very file."""
    return deltas.is_file() and deltas.stat().st_mtime > source.stat().st_mtime


def run_project(python: Path, *arguments: str) -> None:
    subprocess.run([str(python), str(HERE / "reference_deltas.py"), *arguments], check=True)


# --- ComfyUI's side -----------------------------------------------------------------------------------------


def import_comfyui(path: Path) -> None:
    sys.path.insert(0, str(path.resolve()))
    try:
        import torchvision  # noqa: F401
    except Exception as error:  # noqa: BLE001
        # PyPI's torchvision wheel links the CUDA torch; beside a CPU torch it cannot load. ComfyUI imports it for
        # Stable Cascade / Cosmos / ACE only, never on the SD1/SD2/SDXL path: an empty stand-in lets comfy.sd import.
        print(f"note: torchvision unusable here ({type(error).__name__}); a stand-in module takes its place",
              file=sys.stderr)
        for name in ("torchvision", "torchvision.transforms", "torchvision.models"):
            sys.modules[name] = _StandIn(name)
    global comfy
    from comfy.cli_args import args as comfy_args

    # float32 weights, the text encoders' too (ComfyUI keeps them in float16 by default, even on a CPU, and rounds
    # each patched weight stochastically to float16: a difference of one float16 step, 6e-5 on 0.1, not a wrong ΔW)
    comfy_args.cpu = True
    comfy_args.fp32_text_enc = True
    import comfy.lora
    import comfy.lora_convert
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.sd
    import comfy.utils


class _StandIn(types.ModuleType):
    def __init__(self, name: str):
        super().__init__(name)
        self.__spec__ = importlib.machinery.ModuleSpec(name, None)
        self.__path__ = []

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _StandIn(f"{self.__name__}.{name}")


@contextmanager
def captured_log() -> Iterator[list[str]]:
    """ComfyUI's warnings while loading (it logs unmatched keys through the root logger)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect(logging.WARNING)
    logging.getLogger().addHandler(handler)
    try:
        yield messages
    finally:
        logging.getLogger().removeHandler(handler)


def module_names(lora: dict) -> list[str]:
    return sorted({key.partition(".")[0] for key in lora})


def new_row(path: Path, family: str, lora: dict, strengths: list[float]) -> dict:
    return dict(file=path.name, family=family, modules=len(module_names(lora)), patched=0, problems=[],
                unmapped=[], shape_errors=[], max_delta=0.0, max_diff={s: 0.0 for s in strengths},
                compared={s: set() for s in strengths})  # modules whose ΔW was compared, per strength


def check_checkpoint(checkpoint: Path, files: list[Path], work: Path, strengths: list[float]) -> list[dict]:
    print(f"ComfyUI loads {checkpoint.name} ...", flush=True)
    with captured_log() as log:
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=False)
    missed = [message for message in log if message.startswith(LOAD_PROBLEMS)]
    if missed:
        raise SystemExit(f"ComfyUI did not load {checkpoint.name} whole: " + "; ".join(m[:300] for m in missed))
    # SD15 or SD20, and the prediction type ComfyUI guesses from the weights (a random SD2 reads as EPS)
    family = f"{type(model.model.model_config).__name__} {model.model.model_type.name}"
    print(f"ComfyUI detects {family}", flush=True)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    rows = []
    for path in files:
        lora = comfy.utils.load_torch_file(str(path))
        row = new_row(path, family, lora, strengths)
        with captured_log() as log:
            patched_model, patched_clip = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
        row["problems"] = [m for m in log if m.startswith(PROBLEMS)]
        row["patched"] = len(patched_model.patches) + len(patched_clip.patcher.patches)
        row["unmapped"] = [name for name in module_names(lora) if name not in key_map]
        del patched_model, patched_clip
        with open(work / f"{path.stem}.deltas", "rb") as deltas:
            for chunk in _chunks(read_records(deltas)):
                part = {key: tensor for key, tensor in lora.items() if key.partition(".")[0] in dict(chunk)}
                for strength in strengths:
                    _compare_patched(model, clip, part, chunk, key_map, strength, row)
        rows.append(row)
        print(f"  {path.name}: done", flush=True)
    return rows


def _chunks(records: Iterator[tuple[str, torch.Tensor]]) -> Iterator[list[tuple[str, torch.Tensor]]]:
    chunk, size = [], 0
    for name, delta in records:
        chunk.append((name, delta))
        size += delta.numel() * 4
        if size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _compare_patched(model, clip, part: dict, chunk: list, key_map: dict, strength: float, row: dict) -> None:
    """ComfyUI patches the part's weights at ``strength`` (patch_model), each change is compared, then unpatched."""
    with captured_log() as log:
        patched_model, patched_clip = comfy.sd.load_lora_for_models(model, clip, part, strength, strength)
    row["problems"] += [m for m in log if m.startswith(PROBLEMS)]
    patchers = (patched_model, patched_clip.patcher)
    with captured_log() as log:
        for patcher in patchers:
            patcher.patch_model()
    row["problems"] += [m for m in log if m.startswith(PROBLEMS)]
    try:
        for name, delta in chunk:
            key = key_map.get(name)
            patcher = next((p for p in patchers if key in p.patches), None)
            if patcher is None:
                continue  # counted as unmapped / not patched
            now = comfy.utils.get_attr(patcher.model, key).detach().float()
            before = patcher.backup[key].weight.detach().float()
            _record(row, name, now - before, delta, strength)
    finally:
        for patcher in patchers:
            patcher.unpatch_model()


def _record(row: dict, name: str, change: torch.Tensor, delta: torch.Tensor, strength: float) -> None:
    if tuple(change.shape) != tuple(delta.shape):
        row["shape_errors"].append(f"{name}: ComfyUI {tuple(change.shape)}, Train Tools {tuple(delta.shape)}")
        return
    row["max_diff"][strength] = max(row["max_diff"][strength], float((change - strength * delta).abs().max()))
    row["max_delta"] = max(row["max_delta"], float(delta.abs().max()))
    row["compared"][strength].add(name)


def header_shapes(path: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}


def comfy_sdxl_on_meta(shapes: dict[str, list[int]]):
    """ComfyUI's SDXL as it would load this checkpoint, built on the meta device: (UNet, CLIP, config name)."""
    state = {key: torch.empty(shape, dtype=torch.float16, device="meta") for key, shape in shapes.items()}
    prefix = comfy.model_detection.unet_prefix_from_state_dict(state)
    config = comfy.model_detection.model_config_from_unet(state, prefix)
    if config is None:
        raise SystemExit("ComfyUI does not detect these shapes as a model")
    config.set_inference_dtype(torch.float32, None)
    unet = config.get_model(state, prefix, device="meta")
    target = config.clip_target(state_dict=state)
    clip_model = target.clip(**dict(target.params, device="meta", dtype=torch.float32, model_options={}))
    return unet, clip_model, type(config).__name__


def check_sdxl(files: list[Path], shapes: dict, python: Path, strengths: list[float], every: int) -> list[dict]:
    unet, clip_model, detected = comfy_sdxl_on_meta(shapes)
    print(f"ComfyUI detects the SDXL shapes as {detected}; UNet and CLIP built on the meta device", flush=True)
    key_map = comfy.lora.model_lora_keys_unet(unet, {})
    key_map = comfy.lora.model_lora_keys_clip(clip_model, key_map)
    cpu = torch.device("cpu")
    rows = []
    for path in files:
        lora = comfy.lora_convert.convert_lora(comfy.utils.load_torch_file(str(path)))
        row = new_row(path, f"SDXL ({detected}, meta)", lora, strengths)
        patchers = {}
        for strength in strengths:  # load_lora_for_models' steps, on ModelPatchers of the meta-built models
            with captured_log() as log:
                loaded = comfy.lora.load_lora(lora, key_map)
                pair = (comfy.model_patcher.ModelPatcher(unet, cpu, cpu),
                        comfy.model_patcher.ModelPatcher(clip_model, cpu, cpu))
                accepted = set(pair[0].add_patches(loaded, strength)) | set(pair[1].add_patches(loaded, strength))
            row["problems"] += [m for m in log if m.startswith(PROBLEMS)]
            row["problems"] += [f"NOT LOADED {key}" for key in loaded if key not in accepted]
            patchers[strength] = pair
        row["patched"] = sum(len(p.patches) for p in patchers[strengths[0]])
        row["unmapped"] = [name for name in module_names(lora) if name not in key_map]
        layers = {**unet.state_dict(), **clip_model.state_dict()}
        for name in module_names(lora):  # every module's shape, also those whose ΔW is not compared
            key = key_map.get(name)
            expected = _file_weight_shape(lora, name)
            shape = tuple(layers[key].shape) if key in layers else None
            if shape and expected and (shape[0], math.prod(shape[1:])) != expected:
                row["shape_errors"].append(f"{name}: ComfyUI {shape}, file {expected}")
        process = subprocess.Popen([str(python), str(HERE / "reference_deltas.py"), "sdxl-deltas", str(path),
                                    "--every", str(every)], stdout=subprocess.PIPE)
        row["sampled"] = every
        for name, delta in read_records(process.stdout):
            key = key_map.get(name)
            if key is None or key not in layers:
                continue
            base = stand_in_base_weight(name, tuple(layers[key].shape))
            for strength, pair in patchers.items():
                patcher = next((p for p in pair if key in p.patches), None)
                if patcher is not None:
                    change = comfy.lora.calculate_weight(patcher.patches[key], base.clone(), key) - base
                    _record(row, name, change, delta, strength)
        if process.wait() != 0:
            raise SystemExit(f"reference_deltas.py sdxl-deltas {path.name} failed")
        rows.append(row)
        print(f"  {path.name}: done", flush=True)
    return rows


def _file_weight_shape(lora: dict, name: str) -> tuple[int, ...] | None:
    """The (out, in·k·k) a module's factors make, for the LoRA and LoHa layouts (LoKr's is checked by its ΔW)."""
    if f"{name}.lora_up.weight" in lora:
        up, down = lora[f"{name}.lora_up.weight"], lora[f"{name}.lora_down.weight"]
        return (up.shape[0], math.prod(down.shape[1:]))
    if f"{name}.hada_w1_a" in lora:
        return (lora[f"{name}.hada_w1_a"].shape[0], lora[f"{name}.hada_w1_b"].shape[1])
    return None


def print_table(rows: list[dict], strengths: list[float], tolerance: float) -> int:
    head = ["file", "model", "modules", "ComfyUI patched", "not loaded", "ΔW compared", "max |ΔW|",
            *[f"max |diff| @{s:g}" for s in strengths]]
    lines = [head]
    failed = False
    for row in rows:
        diffs = [row["max_diff"][s] for s in strengths]
        compared = min(len(names) for names in row["compared"].values())
        ok = (not row["problems"] and not row["unmapped"] and not row["shape_errors"]
              and row["patched"] == row["modules"] and row["max_delta"] > 0
              and compared == -(-row["modules"] // row.get("sampled", 1))
              and max(diffs) <= tolerance)
        failed |= not ok
        lines.append([row["file"], row["family"], str(row["modules"]), str(row["patched"]),
                      str(len(row["problems"]) + len(row["unmapped"])), str(compared),
                      f"{row['max_delta']:.3e}", *[f"{d:.2e}" for d in diffs]])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for index, line in enumerate(lines):
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)))
        if index == 0:
            print("  ".join("-" * width for width in widths))
    for row in rows:
        for message in (row["problems"] + [f"no ComfyUI key for {n}" for n in row["unmapped"]]
                        + row["shape_errors"])[:20]:
            print(f"{row['file']}: {message}")
    print("FAILED" if failed else f"OK: every key loaded and every ΔW within {tolerance:g}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
