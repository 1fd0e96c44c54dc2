"""Local text-encoder folders by name (`text_encoders: [{name, path}]` in a config, `text_folders` in a run's
model.json, `--text-path`): registered once per process, found by every place that loads a text encoder by name."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from hnet.typed_yaml import ConfigError

# training, evaluation, FLOPs and identity find a name's folder here, as they find a hub name's copy
TEXT_FOLDERS: dict[str, str] = {}


def text_entry_name(entry: Any) -> str:
    return str(entry["name"]) if isinstance(entry, dict) else str(entry)


def register_text_folders(entries: list, where: str = "text_encoders") -> None:
    """Record the `{name, path}` entries' folders (`~` expanded, made absolute, written back into the entry so that
    a dumped config reloads from anywhere) under their names."""
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            continue
        unknown = sorted(set(entry) - {"name", "path"})
        if "name" not in entry or "path" not in entry or unknown:
            raise ConfigError(f"{where}[{i}]: expected {{name, path}}, got keys {sorted(entry)}")
        entry["path"] = register_text_folder(str(entry["name"]), str(entry["path"]), f"{where}[{i}]")


def register_text_folder(name: str, path: str, where: str) -> str:
    """Make text encoder `name` load from folder `path` in this process; returns the folder, absolute."""
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise ConfigError(f"{where}.path: folder not found: {folder} (text encoder '{name}')")
    if "@" in name:  # options apply to a name (NAME@layers=3 finds NAME's folder)
        raise ConfigError(f"{where}.name: '{name}': name the folder without options, and list '{name}' as a "
                          f"further text encoder")
    if TEXT_FOLDERS.get(name, str(folder)) != str(folder):
        raise ConfigError(f"{where}.path: '{name}' is already the folder {TEXT_FOLDERS[name]}, not {folder}")
    TEXT_FOLDERS[name] = str(folder)
    return str(folder)
