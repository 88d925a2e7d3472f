"""Find a model's HuggingFace config without the network.

Order: a shipped preset (``presets/*.json``, matched by full hub name, short name or file stem,
case-insensitively), then a local directory holding config.json or a path to a .json file, then
the hub as a last resort. Weights are never loaded: every model is randomly initialized.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from tp_bench.core.errors import ConfigError

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass(frozen=True)
class Preset:
    key: str          # file stem, e.g. "qwen3-1.7b"
    name: str         # hub name, e.g. "Qwen/Qwen3-1.7B"
    path: Path


def list_presets() -> list[Preset]:
    presets = []
    for path in sorted(PRESET_DIR.glob("*.json")):
        name = json.loads(path.read_text())["_name_or_path"]
        presets.append(Preset(key=path.stem, name=name, path=path))
    return presets


def find_preset(model_name: str) -> Preset | None:
    wanted = model_name.strip().lower()
    for preset in list_presets():
        aliases = {preset.key, preset.name.lower(), preset.name.split("/")[-1].lower()}
        if wanted in aliases:
            return preset
    return None


def _config_from_json(path: Path, name: str):
    from transformers import AutoConfig

    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a model config is a JSON object, not {type(data).__name__}")
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise ConfigError(f"{path}: config has no model_type")
    data.pop("_name_or_path", None)
    try:
        config = AutoConfig.for_model(model_type, **data)
    except ValueError as exc:
        raise ConfigError(f"{name}: model_type {model_type!r} is not known to the installed "
                          f"transformers ({exc})") from None
    config._name_or_path = name
    return config


def looks_like_path(model_name: str) -> bool:
    """A local path, not a hub id: starts like a path, or names a .json file (hub ids are
    ``org/name``)."""
    return (model_name.startswith(("/", "./", "../", "~", ".\\")) or model_name.endswith(".json")
            or model_name.count("/") > 1)


def load_hf_config(model_name: str):
    """Return a transformers PretrainedConfig for a preset, a local path or a hub name."""
    preset = find_preset(model_name)
    if preset is not None:
        return _config_from_json(preset.path, preset.name)
    path = Path(model_name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{model_name}: this directory has no config.json")
        return _config_from_json(path / "config.json", model_name)
    if path.is_file():
        if path.suffix != ".json":
            raise ConfigError(f"{model_name}: not a .json model config")
        return _config_from_json(path, model_name)
    if looks_like_path(model_name):
        raise ConfigError(f"{model_name}: no such file or directory")
    known = ", ".join(p.name for p in list_presets())
    if os.environ.get("HF_HUB_OFFLINE") == "1" or "/" not in model_name:
        raise ConfigError(f"unknown model {model_name!r}: not a preset ({known}) "
                          f"and not a local directory or config.json")
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model_name)
    except Exception as exc:  # any hub failure (offline, gated, missing) reads the same to a user
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"unknown model {model_name!r}: not a preset ({known}), no such local "
                          f"path, and the hub lookup failed ({reason})") from None
