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


class ShardWriter:
    """Writes buckets of HF tensors as shard files `{prefix}-{k}.safetensors` into a staging
    directory; `files` lists (file, tensor names, bytes) for `publish`."""

    def __init__(self, staging: Path, prefix: str = "part") -> None:
        self.staging, self.prefix = Path(staging), prefix
        self.files: List[Tuple[str, List[str], int]] = []
        self.dtypes = set()

    def write(self, bucket: Sequence[Tuple[str, torch.Tensor]]) -> None:
        import safetensors.torch

        tensors, storages = {}, set()
        for name, tensor in bucket:
            tensor = tensor.detach().to("cpu").contiguous()
            if tensor.untyped_storage().data_ptr() in storages:  # safetensors refuses shared memory
                tensor = tensor.clone()
            storages.add(tensor.untyped_storage().data_ptr())
            tensors[name] = tensor
            self.dtypes.add(tensor.dtype)
        file = f"{self.prefix}-{len(self.files):05d}.safetensors"
        safetensors.torch.save_file(tensors, str(self.staging / file), metadata={"format": "pt"})
        self.files.append((file, list(tensors), sum(t.numel() * t.element_size() for t in tensors.values())))


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
    total exceeds `max_shard_bytes`) as a HF checkpoint directory `path`, atomically (see the
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
            nbytes = state[name].numel() * state[name].element_size()
            if max_shard_bytes and bucket and size + nbytes > max_shard_bytes:
                writer.write(bucket)
                bucket, size = [], 0
            bucket.append((name, state[name]))
            size += nbytes
        writer.write(bucket)
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

