"""Packed MX checkpoints: save a quantized model as real MX codes, reload it bit-identically.

Most PTQ tools save fake-quantized fp16 weights, as large as the original. Here every quantized
linear's weight is stored as what MX hardware would read (OCP MX v1.0 section 5): per block of B
elements one E8M0 shared scale (1 byte) and B packed b-bit element codes, so a quantized weight
takes (b + 8/B) bits per element = (b + 8/B)/16 of its fp16 size (4.25/16 for MXINT4/MXFP4, B=32).

A checkpoint is a directory (issue 8)::

    config.json, tokenizer files   the base model's architecture and tokenizer
    model.safetensors              for each MXLinear `<m>`: `<m>.weight.codes` (uint8, packed codes)
                                   and `<m>.weight.scale_e8m0` (uint8); every other parameter and
                                   buffer under its own name in its original dtype; the safetensors
                                   metadata key "mxptq" holds a JSON header (formats, shapes, dtypes)
    recipe.json                    the recipe as parsed (CLI overrides included) and its sha256;
                                   the module swaps are re-derived from it
    recipe.toml                    the recipe file verbatim, when there was one (for people)
    rotation.json                  the rotation search's decisions and the rotations applied
    report.json                    the run's report, with this checkpoint's size section
    manifest.json                  sha256 and size of every other file, mxptq version, format version

Only safetensors and JSON are written: nothing is pickled, so loading never runs stored code.
The directory is written to a temporary sibling and renamed into place at the end, so a crash
never leaves a half-written checkpoint where a later run would read it. The directory and its
files get the modes a plain mkdir/open gives under the umask, not tempfile's 0700/0600 (issue 29).

Reloading (`load_quantized`) verifies the manifest first, builds the architecture from
config.json with meta (unallocated) parameters, re-applies the recipe's module swaps with
`mxptq.stages.transform.quantize_model`, then installs weights decoded from the stored codes and
scales (never re-quantized from anything), the other tensors and the rotations. The reloaded
model's logits are bit-identical to the in-memory quantized model's on the same device and dtype.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mxptq import __version__
from mxptq.errors import CheckpointError
from mxptq.io import atomic_save_safetensors, fsync_dir, make_temp_dir

#: Name written in manifest.json["format"]; a directory whose manifest lacks it is not ours.
CHECKPOINT_FORMAT = "mxptq-packed-mx"
#: Version of the layout described in the module docstring. Bump when a reader of the old
#: version would misread a new checkpoint; readers refuse versions newer than theirs.
CHECKPOINT_FORMAT_VERSION = 1

MANIFEST_FILE = "manifest.json"
TENSORS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
RECIPE_TOML_FILE = "recipe.toml"
RECIPE_JSON_FILE = "recipe.json"
ROTATION_FILE = "rotation.json"
REPORT_FILE = "report.json"
#: Files every checkpoint has (tokenizer files and recipe.toml are optional).
REQUIRED_FILES = (CONFIG_FILE, TENSORS_FILE, RECIPE_JSON_FILE, ROTATION_FILE, REPORT_FILE)
#: Key of the JSON header inside the safetensors metadata (a str -> str map by spec).
HEADER_KEY = "mxptq"
CODES_SUFFIX = ".weight.codes"
SCALE_SUFFIX = ".weight.scale_e8m0"
_HADAMARD_MODULE = "mxptq.nn.hadamard"
# ActQuantizer attributes that hold a rotation: rotation search's (undone after quantizing) and
# the offline stage's fused one (folded into the weight; mxptq/stages/rotate.py).
ROTATION_SLOTS = ("rotation", "fused_rotation")
NON_PERSISTENT = "buffer_non_persistent"  # tensor kind of e.g. RoPE's inv_freq
FP16_BYTES = 2  # the size reference of issue 8: "fp16 size" of a tensor is 2 bytes per element


# --------------------------------------------------------------------------------------------
# Summary of what was written


@dataclass(frozen=True)
class QuantizedTensorSize:
    """On-disk size of one packed weight against the same tensor in fp16."""

    name: str  # "<module>.weight"
    format: str  # Format.label, e.g. "MXINT4(b32,tutorial)"
    numel: int
    codes_bytes: int  # packed b-bit codes
    scale_bytes: int  # one E8M0 byte per block

    @property
    def packed_bytes(self) -> int:
        return self.codes_bytes + self.scale_bytes

    @property
    def fp16_bytes(self) -> int:
        return FP16_BYTES * self.numel

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "format": self.format, "numel": self.numel,
            "codes_bytes": self.codes_bytes, "scale_bytes": self.scale_bytes,
            "packed_bytes": self.packed_bytes, "fp16_bytes": self.fp16_bytes,
            "ratio_to_fp16": self.packed_bytes / self.fp16_bytes,
        }


@dataclass
class CheckpointSummary:
    """Sizes of a written checkpoint: packed weights and everything else, against fp16."""

    path: Path
    quantized: list[QuantizedTensorSize]
    other_bytes: int  # every non-quantized tensor, in its own dtype
    other_numel: int
    tensor_file_bytes: int  # model.safetensors, header included
    files: dict[str, int] = field(default_factory=dict)  # bytes per file (manifest excluded)

    @property
    def quantized_bytes(self) -> int:
        return sum(q.packed_bytes for q in self.quantized)

    @property
    def quantized_fp16_bytes(self) -> int:
        return sum(q.fp16_bytes for q in self.quantized)

    @property
    def tensors_bytes(self) -> int:
        return self.quantized_bytes + self.other_bytes

    @property
    def tensors_fp16_bytes(self) -> int:
        return self.quantized_fp16_bytes + FP16_BYTES * self.other_numel

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    def to_dict(self) -> dict[str, Any]:
        """The report's "checkpoint" section."""
        return {
            "path": str(self.path),
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "quantized_linears": len(self.quantized),
            "quantized_bytes": self.quantized_bytes,
            "quantized_fp16_bytes": self.quantized_fp16_bytes,
            "quantized_ratio_to_fp16": _ratio(self.quantized_bytes, self.quantized_fp16_bytes),
            "other_tensors_bytes": self.other_bytes,
            "other_tensors_fp16_bytes": FP16_BYTES * self.other_numel,
            "tensors_bytes": self.tensors_bytes,
            "tensors_fp16_bytes": self.tensors_fp16_bytes,
            "tensors_ratio_to_fp16": _ratio(self.tensors_bytes, self.tensors_fp16_bytes),
            "tensor_file_bytes": self.tensor_file_bytes,
            "per_tensor": [q.to_dict() for q in self.quantized],
            **({"files": dict(self.files), "total_bytes": self.total_bytes} if self.files else {}),
        }


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


@dataclass
class CheckpointMeta:
    """Everything a checkpoint says about itself besides the model and tokenizer."""

    path: Path
    manifest: dict[str, Any]
    header: dict[str, Any]  # the safetensors JSON header (formats, shapes, dtypes)
    recipe: Any  # mxptq.recipe.Recipe, re-parsed
    recipe_json: dict[str, Any]  # the recipe as parsed at save time
    rotation: dict[str, Any]
    report: dict[str, Any]
    model_info: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        """What an eval-ppl report records about the checkpoint it evaluated."""
        return {
            "path": str(self.path),
            "format": self.manifest.get("format"),
            "format_version": self.manifest.get("format_version"),
            "mxptq_version": self.manifest.get("mxptq_version"),
            "created_at": self.manifest.get("created_at"),
            "dtype": self.header.get("dtype"),
            "recipe_sha256": self.recipe_json.get("sha256"),
            "model": self.model_info,
            "quantized_linears": len(self.header.get("quantized", {})),
            "rotations": [f"{r['module']}.{r['attr']}: {r.get('description')}"
                          for r in self.header.get("rotations", [])],
            "sizes": {k: v for k, v in self.report.get("checkpoint", {}).items() if k != "per_tensor"},
        }


# --------------------------------------------------------------------------------------------
# Save


def save_quantized(
    model: nn.Module,
    recipe: Any,
    out_dir: str | os.PathLike[str],
    *,
    report: Any = None,
    rotation_decisions: Any = None,
    tokenizer: Any = None,
    model_info: Any = None,
) -> CheckpointSummary:
    """Write `model` (after `quantize_model` and optionally rotation search) as a packed MX
    checkpoint directory at `out_dir`; returns its size summary.

    `out_dir` must not exist, be empty, or be an earlier mxptq checkpoint (which is replaced
    atomically); anything else raises CheckpointError rather than deleting a user's files.
    If `report` is a `mxptq.report.Report` (or a dict), its "checkpoint" section is set to the
    summary and the report is stored as report.json.
    """
    out_dir = Path(out_dir)
    _check_replaceable(out_dir)
    dtype = _model_dtype(model)

    tensors, header, summary_parts = _collect_tensors(model)
    header.update({
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "dtype": _dtype_name(dtype),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "rotations": _collect_rotations(model),
    })

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = make_temp_dir(out_dir.parent, prefix=f".{out_dir.name}.tmp-")
    try:
        model.config.to_json_file(str(tmp_dir / CONFIG_FILE), use_diff=False)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp_dir))
        # Through mxptq.io: safetensors' own writer leaves the file 0600 (issue 29).
        atomic_save_safetensors(tmp_dir / TENSORS_FILE, tensors, {HEADER_KEY: json.dumps(header)})

        source = getattr(recipe, "source_path", None)
        if source is not None and Path(source).is_file():  # verbatim copy, for people to read
            shutil.copyfile(source, tmp_dir / RECIPE_TOML_FILE)
        _write_json(tmp_dir / RECIPE_JSON_FILE, {
            "sha256": recipe.sha256,
            "source_path": str(source) if source is not None else None,
            "recipe": recipe.to_dict(),  # as parsed, CLI overrides included; what load uses
        })
        _write_json(tmp_dir / ROTATION_FILE, {
            "decisions": _jsonable(rotation_decisions),
            "applied": header["rotations"],
        })

        quantized, other_bytes, other_numel = summary_parts
        summary = CheckpointSummary(
            path=out_dir, quantized=quantized, other_bytes=other_bytes, other_numel=other_numel,
            tensor_file_bytes=(tmp_dir / TENSORS_FILE).stat().st_size,
        )
        report_data = _report_dict(report)
        report_data["checkpoint"] = summary.to_dict()
        if model_info is not None:
            report_data.setdefault("model", _jsonable(model_info))
        _write_json(tmp_dir / REPORT_FILE, report_data)

        files = sorted(p for p in tmp_dir.rglob("*") if p.is_file())
        manifest_files = {p.relative_to(tmp_dir).as_posix(): _file_entry(p) for p in files}
        summary.files = {name: entry["bytes"] for name, entry in manifest_files.items()}
        _write_json(tmp_dir / MANIFEST_FILE, {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "mxptq_version": __version__,
            "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "torch_version": torch.__version__,
            "model_info": _jsonable(model_info),
            "files": manifest_files,
        })
        _fsync_tree(tmp_dir)
        _replace_dir(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise

    if report is not None:
        report["checkpoint"] = summary.to_dict()
    return summary


def _collect_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any], tuple]:
    """Split the model's tensors into packed MX weights and everything else.

    Every parameter and buffer is stored, non-persistent buffers included (e.g. RoPE's
    inv_freq): the reloaded model then depends on nothing recomputed at init. Tensors shared
    between names (tied embeddings) are stored once; the other names are recorded as aliases.
    """
    from mxptq.formats import pack_codes

    quantized_modules = _mx_linears(model)
    skip = {f"{name}.weight" for name in quantized_modules}
    tensors: dict[str, torch.Tensor] = {}
    kinds: dict[str, str] = {}
    aliases: dict[str, str] = {}
    first_name: dict[int, str] = {}
    other_bytes = other_numel = 0
    named = [("param", n, t) for n, t in model.named_parameters(remove_duplicate=False)]
    named += [(_buffer_kind(model, n), n, t) for n, t in model.named_buffers(remove_duplicate=False)]
    for kind, name, tensor in named:
        if name in skip or tensor is None:
            continue
        if id(tensor) in first_name:
            aliases[name] = first_name[id(tensor)]
            continue
        first_name[id(tensor)] = name
        # clone: safetensors refuses tensors that share storage (views of one another)
        tensors[name] = tensor.detach().to("cpu", copy=True).contiguous()
        kinds[name] = kind
        other_bytes += tensor.numel() * tensor.element_size()
        other_numel += tensor.numel()

    entries: dict[str, Any] = {}
    sizes: list[QuantizedTensorSize] = []
    for name, module in quantized_modules.items():
        fmt = module.weight_fmt
        weight = module.weight.detach()  # encoded where it lives (a GPU is much faster)
        codes, scale_e8m0 = _encode_exact(weight, fmt, name)
        packed = pack_codes(codes.reshape(-1), fmt.bits).cpu().contiguous()
        tensors[name + CODES_SUFFIX] = packed
        tensors[name + SCALE_SUFFIX] = scale_e8m0.cpu().contiguous()
        entries[name] = {
            "format": fmt.to_dict(),
            "label": fmt.label,
            "bits": fmt.bits,
            "shape": list(weight.shape),
            "dtype": _dtype_name(weight.dtype),
            "codes_shape": list(codes.shape),
            "codes_dtype": _dtype_name(codes.dtype),
            "axis": -1,  # blocks run along in_features, the reduction axis (DESIGN.md formats)
            "weight_source": getattr(module, "weight_source", None),  # "rtn" | "gptq"
        }
        sizes.append(QuantizedTensorSize(
            name=f"{name}.weight", format=fmt.label, numel=weight.numel(),
            codes_bytes=packed.numel() * packed.element_size(),
            scale_bytes=scale_e8m0.numel() * scale_e8m0.element_size(),
        ))
    header = {"quantized": entries, "tensor_kinds": kinds, "aliases": aliases}
    return tensors, header, (sizes, other_bytes, other_numel)


def _encode_exact(weight: torch.Tensor, fmt: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and E8M0 scales whose decode (in the weight's dtype) equals `weight` exactly.

    `weight` already lies on the MX grid, but re-encoding it is not always the identity: under
    the tutorial's MXINT rule e = ceil(log2 amax), a block whose max rounds down to exactly
    2^(e-1) gets scale e-1 on re-encoding, where +2^(b-1) does not fit (DESIGN.md formats; ~7%
    of the blocks of a Gaussian MXINT4 weight); and GPTQ's clip search picks scales below the
    absmax one. So: encode, decode, compare, and for the blocks that differ find the scale byte
    nearest to encode's whose grid holds every element of the block.

    Equality is by value: a -0.0 weight (MXINT has no -0 code) reloads as +0.0, which changes
    no sum that has any non-zero term.
    """
    from mxptq.formats import decode, encode

    if weight.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D linear weight, got shape {tuple(weight.shape)}")
    codes, scale_e8m0 = encode(weight.float(), fmt, axis=-1)
    decoded = decode(codes, scale_e8m0, fmt, axis=-1, dtype=weight.dtype)
    bad = _mismatched_blocks(decoded, weight, fmt.block_size)
    if bad.any():
        device = codes.device
        codes, scale_e8m0 = _repair_blocks(weight.cpu(), codes.cpu(), scale_e8m0.cpu(), bad.cpu(), fmt, name)
        codes, scale_e8m0 = codes.to(device), scale_e8m0.to(device)
    return codes, scale_e8m0


def _mismatched_blocks(decoded: torch.Tensor, weight: torch.Tensor, block_size: int) -> torch.Tensor:
    """Bool [rows, blocks]: True where some element of the block decodes to another value."""
    equal = decoded.reshape(weight.shape) == weight
    return ~_blocks(equal, block_size, True).all(dim=-1)


def _blocks(x: torch.Tensor, block_size: int, pad_value: Any) -> torch.Tensor:
    """[rows, n] -> [rows, blocks, block_size], the last block padded (as formats/mx.py does)."""
    pad = (-x.shape[-1]) % block_size
    if pad:
        x = torch.cat([x, x.new_full((*x.shape[:-1], pad), pad_value)], dim=-1)
    return x.reshape(*x.shape[:-1], -1, block_size)


def _repair_blocks(weight: torch.Tensor, codes: torch.Tensor, scale_e8m0: torch.Tensor,
                   bad: torch.Tensor, fmt: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-encode the `bad` blocks: try scale bytes at distance 1, 2, ... from encode's choice
    (both signs) until every element of the block is a decoded value at that scale. Vectorized
    over blocks (a 1B model has millions of such blocks under the tutorial rule)."""
    n = weight.shape[-1]
    table, code_values = _code_table(fmt, weight.dtype, codes.dtype)  # [256, codes]
    where = bad.nonzero(as_tuple=True)
    values = _blocks(weight, fmt.block_size, 0)[where]  # [K, B]; padding 0 is on every grid
    first_guess = scale_e8m0[where].to(torch.int64)
    new_codes = torch.zeros(values.shape, dtype=codes.dtype)
    new_scale = first_guess.clone()
    solved = torch.zeros(len(values), dtype=torch.bool)
    for distance in range(1, 256):
        for scale_byte_offset in (distance, -distance):
            todo = (~solved).nonzero().squeeze(1)
            candidate = first_guess[todo] + scale_byte_offset
            keep = (candidate >= 0) & (candidate < 255)  # byte 255 is the NaN scale
            for chunk, scale in zip(todo[keep].split(4096), candidate[keep].split(4096)):
                hits = values[chunk][:, :, None] == table[scale][:, None, :]  # [k, B, codes]
                fits = hits.any(dim=-1).all(dim=-1)
                chunk, hits = chunk[fits], hits[fits]
                new_codes[chunk] = code_values[hits.int().argmax(dim=-1)]
                new_scale[chunk] = scale[fits]
                solved[chunk] = True
        if bool(solved.all()):
            break
    if not bool(solved.all()):
        row, block = (int(w[(~solved).nonzero()[0, 0]]) for w in where)
        raise CheckpointError(f"weight of {name} (row {row}, block {block}) is not representable in "
                              f"{fmt.label}; was it changed after quantization?")
    code_blocks = _blocks(codes, fmt.block_size, 0).clone()
    code_blocks[where] = new_codes
    scale_e8m0 = scale_e8m0.clone()
    scale_e8m0[where] = new_scale.to(torch.uint8)
    return code_blocks.reshape(codes.shape[0], -1)[:, :n].contiguous(), scale_e8m0


def _code_table(fmt: Any, dtype: torch.dtype, codes_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """table[s, i] = decode of code_values[i] under E8M0 scale byte s, in `dtype`.

    Built with `decode` itself, so no format math is repeated here (STYLE.md rule 1).
    """
    from mxptq.formats import decode

    count = 2 ** fmt.bits
    code_values = torch.arange(count) - (count // 2 if codes_dtype.is_signed else 0)
    width = -(-count // fmt.block_size) * fmt.block_size
    codes = torch.zeros(256, width, dtype=torch.int64)
    codes[:, :count] = code_values
    scales = torch.arange(256, dtype=torch.int64)[:, None].expand(256, width // fmt.block_size)
    table = decode(codes.to(codes_dtype), scales.to(torch.uint8).contiguous(), fmt, axis=-1, dtype=dtype)
    return table[:, :count], code_values.to(codes_dtype)


def _collect_rotations(model: nn.Module) -> list[dict[str, Any]]:
    """Every activation quantizer that rotation search gave a rotation (ActQuantizer.rotation),
    as the rotation's class name (from mxptq.nn.hadamard) and its dataclass fields."""
    applied = []
    for module_name, module in model.named_modules():
        for attr, value in sorted(vars(module).items()):
            if not _is_act_quantizer(value):
                continue
            for slot in ROTATION_SLOTS:
                rotation = getattr(value, slot, None)
                if rotation is None:
                    continue
                if not dataclasses.is_dataclass(rotation) or type(rotation).__module__ != _HADAMARD_MODULE:
                    raise CheckpointError(f"{module_name}.{attr}: rotation of type {type(rotation).__name__} "
                                          f"cannot be saved; allowed: rotations from {_HADAMARD_MODULE}")
                entry = {
                    "module": module_name,
                    "attr": attr,
                    "class": type(rotation).__name__,
                    "fields": {f.name: _jsonable(getattr(rotation, f.name))
                               for f in dataclasses.fields(rotation) if f.init},
                    "description": rotation.description,
                }
                if slot != "rotation":  # entries written before issue 22 have no slot
                    entry["slot"] = slot
                applied.append(entry)
    return applied


# --------------------------------------------------------------------------------------------
# Load


def verify_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check that `path` is a complete, unaltered checkpoint this mxptq can read; returns the
    manifest. Every failure is a one-line CheckpointError naming the directory and the file."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory (it does not exist or is a file)")
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: not an mxptq checkpoint (no {MANIFEST_FILE})")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({_one_line(exc)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an mxptq checkpoint ({MANIFEST_FILE} has no "
                              f"format = {CHECKPOINT_FORMAT!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{manifest_path}: format_version {version!r} is not a positive integer")
    if version > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version} (written by mxptq "
            f"{manifest.get('mxptq_version', '?')}) is newer than this mxptq {__version__} reads "
            f"(<= {CHECKPOINT_FORMAT_VERSION}); upgrade mxptq"
        )
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{manifest_path}: no 'files' table")
    for required in REQUIRED_FILES:
        if required not in files:
            raise CheckpointError(f"{manifest_path}: does not list required file {required}")
    for name, entry in files.items():
        file_path = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"{manifest_path}: file name {name!r} points outside the checkpoint")
        if not file_path.is_file():
            raise CheckpointError(f"{path}: missing file {name} (listed in {MANIFEST_FILE})")
        expected_bytes, expected_sha = entry.get("bytes"), entry.get("sha256")
        size = file_path.stat().st_size
        if size != expected_bytes:
            raise CheckpointError(f"{file_path}: size {size} bytes, manifest says {expected_bytes} "
                                  f"(truncated or altered)")
        if _sha256(file_path) != expected_sha:
            raise CheckpointError(f"{file_path}: sha256 does not match the manifest (file altered)")
    return manifest


def read_recipe(path: str | os.PathLike[str]) -> Any:
    """The recipe a checkpoint was made with (after verifying the whole checkpoint), e.g. for
    `mxptq eval-ppl --checkpoint DIR` without a recipe file."""
    path = Path(path)
    verify_checkpoint(path)
    return _load_recipe(path, _read_json(path / RECIPE_JSON_FILE))


def load_quantized(
    path: str | os.PathLike[str],
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> tuple[nn.Module, Any, CheckpointMeta]:
    """Rebuild the quantized model of a checkpoint, without the original weights and without
    re-running GPTQ or rotation search. Returns (model in eval mode, tokenizer or None, meta).

    `dtype` (default: the saved one) is the dtype of parameters and decoded weights; logits are
    bit-identical to the model that was saved only in the saved dtype on the same device.
    Raises CheckpointError before building anything if the directory fails verification.
    """
    path = Path(path)
    manifest = verify_checkpoint(path)
    header = _read_header(path / TENSORS_FILE)
    saved_dtype = _parse_dtype(header.get("dtype", "float32"), "header dtype")
    target_dtype = saved_dtype if dtype is None else _parse_dtype(dtype, "dtype")
    device = torch.device(device) if device is not None else torch.device("cpu")

    recipe_json = _read_json(path / RECIPE_JSON_FILE)
    rotation = _read_json(path / ROTATION_FILE)
    report = _read_json(path / REPORT_FILE)
    recipe = _load_recipe(path, recipe_json)

    model = _build_skeleton(path, saved_dtype, header.get("attn_implementation"))
    model = _apply_swaps(model, recipe)
    _install_tensors(model, path / TENSORS_FILE, header, saved_dtype, target_dtype)
    _apply_rotations(model, header.get("rotations", []))
    model.to(device)
    model.eval()

    tokenizer = None
    if any(name.startswith("tokenizer") for name in manifest["files"]):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    meta = CheckpointMeta(
        path=path, manifest=manifest, header=header, recipe=recipe,
        recipe_json=recipe_json, rotation=rotation, report=report,
        model_info=manifest.get("model_info"),
    )
    return model, tokenizer, meta


def _read_header(tensors_path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(tensors_path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{tensors_path}: unreadable safetensors file ({_one_line(exc)})") from None
    if HEADER_KEY not in metadata:
        raise CheckpointError(f"{tensors_path}: no {HEADER_KEY!r} header; not an mxptq checkpoint")
    try:
        header = json.loads(metadata[HEADER_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{tensors_path}: malformed {HEADER_KEY!r} header ({exc})") from None
    version = header.get("format_version")
    if not isinstance(version, int) or version > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(f"{tensors_path}: tensor header format version {version!r} is not one "
                              f"this mxptq reads (<= {CHECKPOINT_FORMAT_VERSION}); upgrade mxptq")
    return header


def _load_recipe(path: Path, recipe_json: dict[str, Any]) -> Any:
    """The recipe as parsed at save time (CLI overrides included), checked by its hash."""
    from pydantic import ValidationError

    from mxptq.recipe import Recipe

    try:
        recipe = Recipe.from_dict(recipe_json["recipe"])
    except (ValidationError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path / RECIPE_JSON_FILE}: recipe not readable by this mxptq "
                              f"({_one_line(exc)})") from None
    saved_sha = recipe_json.get("sha256")
    if saved_sha is not None and recipe.sha256 != saved_sha:
        raise CheckpointError(f"{path / RECIPE_JSON_FILE}: recipe re-parses with another sha256 "
                              f"than it was saved with; written by an incompatible mxptq version")
    return recipe


def _build_skeleton(path: Path, dtype: torch.dtype, attn_implementation: str | None) -> nn.Module:
    """The base architecture from config.json with its parameters on the meta device: no memory,
    no random init, and the recipe's swap then RTN-quantizes nothing (MX quantization of a meta
    tensor is shape arithmetic only). Every meta tensor is replaced from the file afterwards."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:  # what transformers raises for a bad config
        raise CheckpointError(f"{path / CONFIG_FILE}: cannot build the model ({_one_line(exc)})") from None
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    return model


def _apply_swaps(model: nn.Module, recipe: Any) -> nn.Module:
    """The recipe's module swaps, exactly as the original run made them (same selectors, same
    registration order); their (meta) weights are replaced from the file next."""
    from mxptq.errors import ModelError
    from mxptq.stages.transform import quantize_model

    try:
        return quantize_model(model, recipe, None)
    except ModelError as exc:
        raise CheckpointError(f"recipe does not fit the architecture in config.json ({exc})") from None


def _install_tensors(model: nn.Module, tensors_path: Path, header: dict[str, Any],
                     saved_dtype: torch.dtype, dtype: torch.dtype) -> None:
    """Put every stored tensor into the swapped model; the two name sets must agree exactly."""
    from safetensors import safe_open

    from mxptq.errors import FormatError
    from mxptq.formats import Format, decode, unpack_codes

    quantized: dict[str, Any] = header.get("quantized", {})
    kinds: dict[str, str] = header.get("tensor_kinds", {})
    aliases: dict[str, str] = header.get("aliases", {})
    mx_linears = _mx_linears(model)
    if set(mx_linears) != set(quantized):
        raise CheckpointError(
            f"{tensors_path}: the recipe's module swaps give {len(mx_linears)} MX linears but the "
            f"checkpoint holds {len(quantized)}; first differences: "
            f"{sorted(set(mx_linears) ^ set(quantized))[:3]}"
        )
    expected = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    expected |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    expected -= {f"{name}.weight" for name in quantized}
    if expected != set(kinds) | set(aliases):
        difference = sorted(expected ^ (set(kinds) | set(aliases)))
        raise CheckpointError(f"{tensors_path}: tensors do not match the architecture in config.json "
                              f"and the recipe; first differences: {difference[:3]}")

    with safe_open(str(tensors_path), framework="pt") as handle:
        for name, kind in kinds.items():
            tensor = handle.get_tensor(name)
            if kind != NON_PERSISTENT and tensor.dtype == saved_dtype:
                tensor = tensor.to(dtype)  # a dtype override; RoPE's fp32 inv_freq stays fp32
            _set_tensor(model, name, tensor, kind)
        for alias, target in aliases.items():
            owner, leaf = _owner(model, target)
            alias_owner, alias_leaf = _owner(model, alias)
            if leaf in owner._parameters:
                alias_owner._parameters[alias_leaf] = owner._parameters[leaf]
            else:
                alias_owner._buffers[alias_leaf] = owner._buffers[leaf]
        for name, entry in quantized.items():
            try:
                fmt = Format.from_dict(entry["format"])
                codes_shape = [int(size) for size in entry["codes_shape"]]
                rows, cols = entry["shape"]
            except (FormatError, KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"{tensors_path}: header entry for {name} is not readable by "
                                      f"this mxptq ({_one_line(exc)})") from None
            if fmt != mx_linears[name].weight_fmt:
                raise CheckpointError(f"{tensors_path}: {name} is stored as {fmt.label} but the recipe "
                                      f"makes it {mx_linears[name].weight_fmt.label}")
            numel = math.prod(codes_shape)
            codes = unpack_codes(handle.get_tensor(name + CODES_SUFFIX), fmt.bits, numel,
                                 signed=fmt.element.code_dtype.is_signed)
            scale_e8m0 = handle.get_tensor(name + SCALE_SUFFIX)
            weight = decode(codes.reshape(codes_shape), scale_e8m0, fmt, axis=-1, dtype=dtype)
            _install_weight(mx_linears[name], weight[..., :cols].reshape(rows, cols).contiguous())
            if entry.get("weight_source") is not None:  # reprs and reports say "gptq" again
                mx_linears[name].weight_source = entry["weight_source"]
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.device.type == "meta"]
    if left:  # an internal invariant: the name sets were checked equal above
        raise AssertionError(f"tensors not loaded from {tensors_path}: {left[:3]}")


def _install_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Give an MXLinear its decoded weight (its `weight` buffer holds dequantized values)."""
    setter = getattr(module, "set_quantized_weight", None)
    if callable(setter):
        setter(weight)
        return
    if "weight" in module._buffers:
        module._buffers["weight"] = weight
    else:
        module._parameters["weight"] = nn.Parameter(weight, requires_grad=False)


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor, kind: str) -> None:
    owner, leaf = _owner(model, name)
    if kind == "param":
        old = owner._parameters[leaf]
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=old.requires_grad
                                               if old is not None and old.is_floating_point() else False)
    else:
        owner._buffers[leaf] = tensor


def _buffer_kind(model: nn.Module, name: str) -> str:
    owner, leaf = _owner(model, name)
    return NON_PERSISTENT if leaf in owner._non_persistent_buffers_set else "buffer"


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, leaf = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), leaf


def _apply_rotations(model: nn.Module, rotations: list[dict[str, Any]]) -> None:
    """Re-create each saved rotation (a deterministic Hadamard construction, rebuilt from its
    fields; only classes of mxptq.nn.hadamard, never an arbitrary import) on its quantizer."""
    if not rotations:
        return
    import importlib

    hadamard = importlib.import_module(_HADAMARD_MODULE)
    for entry in rotations:
        where = f"{entry.get('module')}.{entry.get('attr')}"
        cls = getattr(hadamard, str(entry.get("class")), None)
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise CheckpointError(f"rotation for {where}: unknown rotation class {entry.get('class')!r}")
        try:
            quantizer = getattr(model.get_submodule(entry["module"]), entry["attr"])
        except AttributeError:
            raise CheckpointError(f"rotation for {where}: no such quantizer in the rebuilt model") from None
        if not _is_act_quantizer(quantizer):
            raise CheckpointError(f"rotation for {where}: not an activation quantizer")
        slot = entry.get("slot", "rotation")
        if slot not in ROTATION_SLOTS:
            raise CheckpointError(f"rotation for {where}: unknown slot {slot!r}; allowed: {', '.join(ROTATION_SLOTS)}")
        try:
            setattr(quantizer, slot, cls(**entry["fields"]))
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"rotation for {where}: {_one_line(exc)}") from None


# --------------------------------------------------------------------------------------------
# Helpers


def _mx_linears(model: nn.Module) -> dict[str, nn.Module]:
    """MXLinear modules whose weight is quantized (weight_fmt set), by qualified name."""
    from mxptq.nn.linear import MXLinear

    return {name: module for name, module in model.named_modules()
            if isinstance(module, MXLinear) and getattr(module, "weight_fmt", None) is not None}


def _is_act_quantizer(value: Any) -> bool:
    try:
        from mxptq.nn.quantizer import ActQuantizer
    except ImportError:  # nn not installed in this build: no rotations can exist
        return False
    return isinstance(value, ActQuantizer)


def _model_dtype(model: nn.Module) -> torch.dtype:
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _parse_dtype(value: torch.dtype | str, what: str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    resolved = getattr(torch, str(value), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise CheckpointError(f"{what} {value!r} is not a floating dtype; allowed: float16, "
                              f"bfloat16, float32")
    return resolved


def _report_dict(report: Any) -> dict[str, Any]:
    if report is None:
        return {}
    data = getattr(report, "data", report)
    return dict(_jsonable(data))


def _jsonable(obj: Any) -> Any:
    """JSON-ready copy: Formats via to_dict, pydantic models via model_dump, paths as str."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (Path, torch.dtype, torch.device)):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in obj]
    to_dict = getattr(obj, "to_dict", None)
    if callable(to_dict):
        return _jsonable(to_dict())
    model_dump = getattr(obj, "model_dump", None)
    if callable(model_dump):
        fields = getattr(type(obj), "model_fields", {})
        return {name: _jsonable(getattr(obj, name)) for name in fields} or _jsonable(model_dump())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    return str(obj)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable JSON ({_one_line(exc)})") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _file_entry(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _check_replaceable(out_dir: Path) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise CheckpointError(f"{out_dir}: exists and is not a directory; choose another output path")
    if any(out_dir.iterdir()) and not _is_checkpoint_dir(out_dir):
        raise CheckpointError(f"{out_dir}: exists, is not empty and is not an mxptq checkpoint; "
                              f"refusing to replace it (choose an empty or new directory)")


def _is_checkpoint_dir(path: Path) -> bool:
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == CHECKPOINT_FORMAT


def _replace_dir(tmp_dir: Path, out_dir: Path) -> None:
    """Move the finished `tmp_dir` to `out_dir`. An existing checkpoint is first renamed aside,
    so at every instant `out_dir` is either the old complete checkpoint, absent, or the new one;
    the old one is deleted only after the new one is in place."""
    old_dir = None
    if out_dir.exists():
        old_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old_dir / "checkpoint")
    try:
        os.replace(tmp_dir, out_dir)
    except BaseException:
        if old_dir is not None:  # put the previous checkpoint back
            os.replace(old_dir / "checkpoint", out_dir)
            shutil.rmtree(old_dir, ignore_errors=True)
        raise
    fsync_dir(out_dir.parent)
    if old_dir is not None:
        shutil.rmtree(old_dir, ignore_errors=True)


def _fsync_tree(directory: Path) -> None:
    for file_path in directory.rglob("*"):
        if file_path.is_file():
            with open(file_path, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(directory)


