"""HF checkpoint directories on disk: config.json plus safetensors weights, one file or shards
listed in model.safetensors.index.json.

Reading checks the config against the tensor headers before any tensor data is read, and reads a
rank's tensors only (`HFCheckpoint.read`). Writing goes through `ShardWriter`: each bucket of
tensors becomes one shard file in a temporary directory next to the target, and `publish` adds the
index and config.json and renames the directory into place, so a half-written export is never
visible under its final name (and, with `overwrite`, the previous one stays until the new one is
complete). Several writers, one per pipeline stage, may fill one temporary directory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from .hf_config import (CONFIG_FILE, CheckpointError, check_same_architecture, check_tensor_shapes,
                        hf_config_from_model, model_config_from_hf, names_list)
from .model import DTYPES, ModelConfig
from .state_adapter import drop_ignored, hf_tensor_shapes

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def _safetensors_files(path: Path) -> Tuple[List[Path], Optional[Dict[str, str]]]:
    index = path / SAFETENSORS_INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map' ({exc})") from exc
        files = sorted(set(weight_map.values()))
        absent = [f for f in files if not (path / f).is_file()]
        if absent:
            raise CheckpointError(f"{index} names shard files that do not exist: {absent}")
        return [path / f for f in files], weight_map
    if (path / SAFETENSORS_FILE).is_file():
        return [path / SAFETENSORS_FILE], None
    present = sorted(p.name for p in path.iterdir())
    raise CheckpointError(f"{path}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} (found {present}); "
                          "only safetensors checkpoints are supported")


class HFCheckpoint:
    """A HF checkpoint directory whose config and tensor headers have been checked against each
    other; tensors are read on demand (`read`), so a rank can load only what it holds."""

    def __init__(self, path, **overrides) -> None:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a checkpoint directory")
        config_path = path / CONFIG_FILE
        if not config_path.is_file():
            raise CheckpointError(f"{path}: no {CONFIG_FILE}")
        try:
            hf_config = json.loads(config_path.read_text())
        except ValueError as exc:
            raise CheckpointError(f"{config_path}: invalid JSON ({exc})") from exc
        self.path = path
        self.cfg = model_config_from_hf(hf_config, **overrides)

        files, weight_map = _safetensors_files(path)
        located: Dict[str, Tuple[Path, Tuple[int, ...]]] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    if name in located:
                        raise CheckpointError(f"tensor {name} is stored twice: in "
                                              f"{located[name][0].name} and {file.name}")
                    located[name] = (file, tuple(handle.get_slice(name).get_shape()))
        if weight_map is not None:
            wrong = [f"{n} (index: {f}, found in: {located[n][0].name if n in located else 'no file'})"
                     for n, f in weight_map.items() if n not in located or located[n][0].name != f]
            if wrong:
                raise CheckpointError(f"{path / SAFETENSORS_INDEX} does not match the shard files: "
                                      f"{names_list(wrong)}")
        shapes = {n: shape for n, (_, shape) in located.items()}
        check_tensor_shapes({n: shapes[n] for n in drop_ignored(shapes, self.cfg)},
                            hf_tensor_shapes(self.cfg), f"checkpoint {path}")
        self.files = {n: file for n, (file, _) in located.items()}

    def read(self, names: Iterable[str]) -> Dict[str, torch.Tensor]:
        """The named tensors, each file opened once."""
        from safetensors import safe_open

        by_file: Dict[Path, List[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for file, wanted in by_file.items():
            with safe_open(str(file), framework="pt") as handle:
                out.update((name, handle.get_tensor(name)) for name in wanted)
        return out


def check_hf_checkpoint(path, cfg: ModelConfig) -> None:
    """Raise `CheckpointError` naming the field or tensor where the HF checkpoint at `path` does not
    hold `cfg`'s model. Reads config.json and the safetensors headers only, no tensor data."""
    check_same_architecture(HFCheckpoint(path).cfg, cfg)


def load_hf_checkpoint(path, **overrides) -> Tuple[ModelConfig, Dict[str, torch.Tensor]]:
    """(ModelConfig, HF state dict) of a HF checkpoint directory: config.json plus either one
    model.safetensors or shards listed in model.safetensors.index.json. Names and shapes are
    checked against config.json from the safetensors headers before any tensor data is read.
    `overrides` set ModelConfig fields (see `model_config_from_hf`)."""
    checkpoint = HFCheckpoint(path, **overrides)
    names = list(hf_tensor_shapes(checkpoint.cfg))
    state = checkpoint.read(names)
    return checkpoint.cfg, {name: state[name] for name in names}


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------


def staging_dir(path) -> Path:
    """A new empty directory next to `path` (same file system, so `publish` is a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))


# safetensors' names for the dtypes a model's weights come in
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                       torch.float64: "F64", torch.int64: "I64", torch.int32: "I32",
                       torch.uint8: "U8", torch.bool: "BOOL"}


@dataclass
class FlatBucket:
    """HF tensors back to back in one byte buffer: the data section of a safetensors file, and
    SGLang's "flattened_bucket" update. `tensors` are views into `flat`, in buffer order."""

    flat: torch.Tensor  # uint8 [bytes]
    tensors: List[Tuple[str, torch.Tensor]]

    @classmethod
    def of(cls, tensors: Sequence[Tuple[str, torch.Tensor]]) -> "FlatBucket":
        """A bucket holding copies of `tensors` (one dtype: the offsets stay aligned)."""
        flat = torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for _, t in tensors])
        views, offset = [], 0
        for name, t in tensors:
            nbytes = t.numel() * t.element_size()
            views.append((name, flat[offset:offset + nbytes].view(t.dtype).view(t.shape)))
            offset += nbytes
        return cls(flat, views)

    @property
    def nbytes(self) -> int:
        return self.flat.numel()

    def fields(self) -> dict:
        """The `/update_weights_from_distributed` fields describing the buffer."""
        return {"names": [n for n, _ in self.tensors],
                "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in self.tensors],
                "shapes": [list(t.shape) for _, t in self.tensors],
                "load_format": "flattened_bucket"}


class ShardWriter:
    """Writes buckets as shard files `{prefix}-{k}.safetensors` into a staging directory, the
    bucket's buffer as the file's data section (no copy on CPU); `files` lists (file, tensor
    names, bytes) for `publish`."""

    def __init__(self, staging: Path, prefix: str = "part") -> None:
        self.staging, self.prefix = Path(staging), prefix
        self.files: List[Tuple[str, List[str], int]] = []
        self.dtypes = set()

    def write(self, bucket: FlatBucket) -> None:
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, t in bucket.tensors:
            nbytes = t.numel() * t.element_size()
            header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            self.dtypes.add(t.dtype)
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
        file = f"{self.prefix}-{len(self.files):05d}.safetensors"
        with open(self.staging / file, "wb") as f:
            f.write(len(encoded).to_bytes(8, "little"))
            f.write(encoded)
            f.write(memoryview(bucket.flat[:offset].cpu().numpy()))
        self.files.append((file, [n for n, _ in bucket.tensors], offset))


def publish(staging: Path, path, cfg: ModelConfig, files: Sequence[Tuple[str, List[str], int]],
            dtypes: Iterable[torch.dtype], *, overwrite: bool) -> Path:
    """Name the shard files as HF does (one file: model.safetensors; more: model-i-of-n plus the
    index), check that they hold exactly `cfg`'s tensors, write config.json, and rename `staging`
    to `path`. On failure `staging` is removed and `path` is as it was."""
    path = Path(path)
    try:
        names = [name for _, held, _ in files for name in held]
        expected = hf_tensor_shapes(cfg)  # shapes were checked where the tensors came from
        check_tensor_shapes({n: expected.get(n, ()) for n in names}, expected, "exported state")
        if len(names) != len(set(names)):
            raise CheckpointError(f"{path}: a tensor was written twice")
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
        dtypes = set(dtypes)
        dtype = {v: k for k, v in DTYPES.items()}.get(next(iter(dtypes))) if len(dtypes) == 1 else None
        (staging / CONFIG_FILE).write_text(json.dumps(hf_config_from_model(cfg, dtype=dtype), indent=2) + "\n")
        if len(files) == 1:
            os.rename(staging / files[0][0], staging / SAFETENSORS_FILE)
        else:
            weight_map = {}
            for i, (file, held, _) in enumerate(files, start=1):
                final = f"model-{i:05d}-of-{len(files):05d}.safetensors"
                os.rename(staging / file, staging / final)
                weight_map.update((name, final) for name in held)
            total = sum(nbytes for _, _, nbytes in files)
            (staging / SAFETENSORS_INDEX).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        _replace_dir(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def save_hf_checkpoint(path, cfg: ModelConfig, hf_state: Mapping[str, torch.Tensor], *,
                       overwrite: bool = False, max_shard_bytes: Optional[int] = None) -> Path:
    """Write config.json and the weights (one model.safetensors; shards plus an index when the
    total exceeds `max_shard_bytes`, or the state mixes dtypes) as a HF checkpoint directory `path`, atomically (see the
    module docstring). The state is validated against `cfg` before anything is written."""
    path = Path(path)
    state = drop_ignored(hf_state, cfg)
    check_tensor_shapes({n: t.shape for n, t in state.items()}, hf_tensor_shapes(cfg), "HF state")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    staging = staging_dir(path)
    try:
        writer = ShardWriter(staging)
        bucket, size = [], 0
        for name in hf_tensor_shapes(cfg):
            tensor = state[name]
            nbytes = tensor.numel() * tensor.element_size()
            if bucket and ((max_shard_bytes and size + nbytes > max_shard_bytes)
                           or tensor.dtype != bucket[-1][1].dtype):
                writer.write(FlatBucket.of(bucket))
                bucket, size = [], 0
            bucket.append((name, tensor.detach().to("cpu")))
            size += nbytes
        writer.write(FlatBucket.of(bucket))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return publish(staging, path, cfg, writer.files, writer.dtypes, overwrite=overwrite)


def _replace_dir(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an existing `target` is moved aside first and restored on failure."""
    if not target.exists():
        os.rename(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.rmdir(old)
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)

