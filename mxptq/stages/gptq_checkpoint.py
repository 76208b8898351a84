"""Per-layer GPTQ checkpoints: crash-safe resume for the GPTQ stage (issue 6).

Layout of `[gptq].checkpoint_dir`:

    manifest.json              what the checkpoint depends on + the finished layers
    layer_0000.safetensors     the GPTQ weights of decoder layer 0 (model dtype), one file a layer
    ...

Every file is written atomically (mxptq.io: temporary file, fsync, os.replace), the layer file
before the manifest entry that names it, so a crash leaves either a complete layer (listed,
with its sha256) or an unlisted file that the next run overwrites.

The manifest's `inputs` holds one sha256 per thing the result depends on (model weights
fingerprint, the [gptq] section, the per-linear weight formats, the calibration windows, the
model dtype and attention implementation, the device type, mxptq and torch versions; the
caller decides the set). A manifest whose inputs differ is never reused: `CheckpointError`
names what changed and says that --force recomputes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mxptq.errors import CheckpointError
from mxptq.io import atomic_save_safetensors, atomic_write_json

MANIFEST_NAME = "manifest.json"
MANIFEST_KIND = "mxptq-gptq-checkpoint"
MANIFEST_VERSION = 1


def layer_file_name(index: int) -> str:
    return f"layer_{index:04d}.safetensors"


def canonical_sha256(value: Any) -> str:
    """sha256 of a JSON-able value in canonical form (sorted keys, no whitespace)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


class LayerCheckpoints:
    """The per-layer checkpoint directory of one GPTQ run.

    `inputs`: {name: JSON-able value} of everything the result depends on; each is hashed
    separately so a mismatch can say which one changed.
    """

    def __init__(self, directory: str | Path, inputs: Mapping[str, Any], num_layers: int) -> None:
        self.directory = Path(directory)
        self.input_hashes = {name: canonical_sha256(value) for name, value in inputs.items()}
        # The manifest version is part of the key: a new layout is never read as an old one.
        self.key = canonical_sha256({"version": MANIFEST_VERSION, "inputs": self.input_hashes})
        self.num_layers = num_layers
        self._layers: dict[str, dict[str, Any]] = {}

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST_NAME

    def open(self, *, force: bool = False) -> dict[int, dict[str, Any]]:
        """Check the directory against our inputs; -> {layer index: saved stats} of the finished
        layers (empty for a new directory). force: discard whatever is there and start over."""
        manifest = None if force else self._read_manifest()
        if manifest is not None and manifest.get("key") != self.key:
            raise CheckpointError(
                f"{self.directory}: GPTQ checkpoint was made with a different {self._changed(manifest)}; "
                "rerun with --force to recompute it (or use another [gptq].checkpoint_dir)"
            )
        if manifest is None:
            self._clear()
            self._layers = {}
            self._write_manifest()
        else:
            self._layers = dict(manifest.get("layers", {}))
        return {int(index): entry.get("stats", {}) for index, entry in self._layers.items()}

    def load_layer(
        self, index: int, expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]]
    ) -> dict[str, torch.Tensor]:
        """The tensors of a finished layer, checked against the manifest's sha256 and against
        `expected` ({tensor name: (shape, dtype)}); anything else is a CheckpointError."""
        from safetensors import SafetensorError
        from safetensors.torch import load as load_safetensors

        entry = self._layers.get(str(index))
        if entry is None:
            raise CheckpointError(f"{self.directory}: layer {index} is not in {MANIFEST_NAME}")
        path = self.directory / entry["file"]
        try:
            data = path.read_bytes()
        except OSError as err:
            raise CheckpointError(
                f"{path}: cannot read GPTQ layer checkpoint ({err.strerror}); rerun with --force"
            ) from None
        if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            raise CheckpointError(
                f"{path}: GPTQ layer checkpoint is corrupt (sha256 differs from {MANIFEST_NAME}); "
                "rerun with --force to recompute"
            )
        try:
            tensors = load_safetensors(data)
        except SafetensorError as err:
            raise CheckpointError(
                f"{path}: GPTQ layer checkpoint is not a safetensors file ({err})"
            ) from None
        if set(tensors) != set(expected) or any(
            tuple(tensors[name].shape) != shape or tensors[name].dtype != dtype
            for name, (shape, dtype) in expected.items()
        ):
            raise CheckpointError(
                f"{path}: GPTQ layer checkpoint holds other tensors than the model needs "
                f"({sorted(tensors)} vs {sorted(expected)}); rerun with --force"
            )
        return tensors

    def save_layer(self, index: int, tensors: Mapping[str, torch.Tensor], stats: Mapping[str, Any]) -> None:
        """Write one finished layer, then list it in the manifest (both atomic, in that order)."""
        name = layer_file_name(index)
        path = atomic_save_safetensors(
            self.directory / name, {key: value.detach().contiguous().cpu() for key, value in tensors.items()}
        )
        self._layers[str(index)] = {
            "file": name,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "stats": dict(stats),
        }
        self._write_manifest()

    # -- internals ----------------------------------------------------------------------------

    def _read_manifest(self) -> dict[str, Any] | None:
        if not self.manifest_path.exists():
            return None
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(
                f"{self.manifest_path}: unreadable GPTQ manifest ({err}); rerun with --force"
            ) from None
        if not isinstance(manifest, dict) or manifest.get("kind") != MANIFEST_KIND:
            raise CheckpointError(
                f"{self.manifest_path}: not a GPTQ checkpoint manifest (kind {MANIFEST_KIND!r} expected); "
                "rerun with --force or use another [gptq].checkpoint_dir"
            )
        return manifest

    def _changed(self, manifest: Mapping[str, Any]) -> str:
        stored = manifest.get("inputs", {})
        changed = [name for name, digest in self.input_hashes.items() if stored.get(name) != digest]
        changed += [name for name in stored if name not in self.input_hashes]
        return ", ".join(changed) if changed else "checkpoint format"

    def _write_manifest(self) -> None:
        atomic_write_json(
            self.manifest_path,
            {
                "kind": MANIFEST_KIND,
                "version": MANIFEST_VERSION,
                "key": self.key,
                "inputs": self.input_hashes,
                "num_layers": self.num_layers,
                "layers": self._layers,
            },
        )

    def _clear(self) -> None:
        """Remove our own files only (the manifest and layer_*.safetensors)."""
        if not self.directory.is_dir():
            return
        for path in self.directory.glob("layer_*.safetensors"):
            path.unlink()
        self.manifest_path.unlink(missing_ok=True)
