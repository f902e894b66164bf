"""Checkpoints: materialising a random-weight model once, and reading a role's share of a checkpoint.

A weight source (stored per parameter in a role's weight map) says how to build one graph parameter
from checkpoint tensors:
  {"key": K}                      the tensor K
  {"key": K, "rows": [a, b]}      rows a..b-1 of K (an expert node's slice of a fused experts tensor)
  {"key": K, "cols": [a, b]}      indices a..b-1 of K's last dimension (a tensor-parallel rank's share of a
                                  row-parallel projection); {"key": K, "dim1": [a, b]}: of its second dimension
                                  (of a 3-D experts tensor); either may be combined with "rows"
  {"stack": [GROUP, ...]}         stack over experts (new dim 0) of the concatenation (dim 0) of each GROUP;
                                  a GROUP is a list of items, each either
                                    K                           the whole tensor K, or
                                    {"key": K, "rows": [a, b]}  rows a..b-1 of K (DBRX: expert e's gate rows
                                                                are rows [e·I, (e+1)·I) of a flattened [E·I, H])
  {"cat": [ITEM, ...]}            the concatenation (dim 0) of items like a stack GROUP's (a tensor-parallel
                                  rank's q, k and v rows of a fused QKV projection)
  {"constant": NAME}              a small computed buffer stored in the bundle (rotary tables)
A key, cat or stack source of a tensor-parallel share may also carry "tp_take": {"of", "dim", "ranges"}, how
the share comes out of the whole tensor (the reader ignores it; random weights make the whole, then take it).

Only the named tensors (or rows) are read from disk. The reader parses the safetensors headers itself and
reads each run of rows with one `readinto` straight into the destination tensor, so a role's peak memory
is its own bytes (plus one tensor when a dtype conversion is needed), and `bytes_read` / `keys_read` /
`files_opened` say exactly what was touched. `stream_load` loads a whole weight map shard by shard.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import struct
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from msc.errors import MscError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

# safetensors dtype names -> torch dtypes (the ones this torch build has)
_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in {
        "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
        "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
        "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
        "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    }.items()
    if hasattr(torch, attr)
}
_MAX_HEADER = 100 << 20  # a safetensors header over 100 MB is a corrupt file, not a real header


def materialize_random(config, seed: int, dtype: torch.dtype, out_dir: Path) -> Path:
    """Build the transformers model with random weights from `seed` and save it as a real checkpoint."""
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tmp = Path(tempfile.mkdtemp(prefix=".ckpt-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in its safetensors file (from the header)."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute file offset of its first byte
    nbytes: int

    @property
    def row_bytes(self) -> int:
        """Bytes of one index along dim 0 (the whole tensor for a 0-d tensor)."""
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of checkpoint tensor `key` (rows None: the whole tensor): what one read fetches."""

    key: str
    rows: tuple[int, int] | None = None
    cols: tuple[tuple[int, int], ...] | None = None  # [start, stop) ranges of the last dimension, concatenated
    dim1: tuple[tuple[int, int], ...] | None = None  # ... of the second dimension (3-D tensors)

    def describe(self) -> str:
        return (f"'{self.key}'" + (f" rows [{self.rows[0]}, {self.rows[1]})" if self.rows else "")
                + (f" columns {[list(r) for r in self.cols]}" if self.cols else "")
                + (f" dim-1 {[list(r) for r in self.dim1]}" if self.dim1 else ""))

    @property
    def inner_slice(self) -> tuple[int, tuple[tuple[int, int], ...]] | None:
        """(dimension, its [start, stop) ranges) of the one non-leading dimension this piece slices, if any."""
        if self.cols is not None and self.dim1 is not None:
            raise MscError(f"checkpoint tensor '{self.key}': a piece slices at most one dimension besides the rows")
        if self.cols is not None:
            return -1, self.cols
        return (1, self.dim1) if self.dim1 is not None else None


def source_groups(source: dict) -> tuple[bool, list[list[Piece]]]:
    """A key/rows/stack source as (stacked, groups of pieces); a key source is one group of one piece."""
    if "stack" in source:
        return True, [[_piece(item) for item in group] for group in source["stack"]]
    if "key" in source:
        return False, [[_piece(source)]]
    if "cat" in source:
        return False, [[_piece(item) for item in source["cat"]]]
    raise MscError(f"weight source {source} is neither a key, a concatenation, a stack nor a constant")


def _piece(item: str | dict) -> Piece:
    if isinstance(item, str):
        return Piece(item)
    pair = lambda v: (int(v[0]), int(v[1])) if v is not None else None  # noqa: E731

    def ranges(v):  # [a, b] or [[a, b], [c, d], ...]
        if v is None:
            return None
        return tuple(pair(r) for r in v) if v and isinstance(v[0], (list, tuple)) else (pair(v),)

    return Piece(item["key"], pair(item.get("rows")), ranges(item.get("cols")), ranges(item.get("dim1")))


def describe_source(source: dict) -> str:
    """The checkpoint tensors of a source, for error messages."""
    if "constant" in source:
        return f"bundle constant '{source['constant']}'"
    stacked, groups = source_groups(source)
    if not stacked:
        return f"checkpoint tensor {groups[0][0].describe()}"
    first = " + ".join(p.describe() for p in groups[0])
    return f"stack of {len(groups)} groups of checkpoint tensors, the first {first}"


class CheckpointReader:
    """Reads tensors (or runs of rows) of a Hugging Face safetensors checkpoint, single file or sharded.

    Counters for what was touched: `bytes_read` (tensor bytes, headers excluded), `keys_read` (key -> reads),
    `files_opened` (shard -> opens for reading data), `headers_read` (shards whose header was parsed).
    """

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise MscError(f"checkpoint directory does not exist: {self.dir}")
        self._headers: dict[Path, dict[str, TensorInfo]] = {}
        self._handles: dict[Path, BinaryIO] = {}
        self.bytes_read = 0
        self.keys_read: Counter[str] = Counter()
        self.files_opened: Counter[Path] = Counter()
        self.headers_read: set[Path] = set()
        if (self.dir / INDEX).is_file():
            index = json.loads((self.dir / INDEX).read_text())
            self.key_to_file = {k: self.dir / f for k, f in index["weight_map"].items()}
        elif (self.dir / SINGLE).is_file():
            self.key_to_file = {k: self.dir / SINGLE for k in self._header(self.dir / SINGLE)}
        else:
            raise MscError(f"no {SINGLE} or {INDEX} in checkpoint directory {self.dir} (msc reads safetensors only)")

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ files and headers
    def keys(self) -> set[str]:
        return set(self.key_to_file)

    def file_of(self, key: str) -> Path:
        if key not in self.key_to_file:
            raise MscError(f"checkpoint {self.dir} has no tensor '{key}'")
        return self.key_to_file[key]

    def files_of(self, source: dict) -> set[Path]:
        """The shard files a source reads, from the index alone (nothing is opened)."""
        if "constant" in source:
            return set()
        return {self.file_of(p.key) for group in source_groups(source)[1] for p in group}

    def open(self, path: Path) -> BinaryIO:
        """Open a shard for reading (once; later calls return the same handle until `release`)."""
        if path not in self._handles:
            # NOTE: unbuffered: every read is one readinto straight into the destination tensor's memory,
            # with no mmap (mapped pages would count toward the role's resident memory) and no extra copy.
            self._handles[path] = open(path, "rb", buffering=0)
            self.files_opened[path] += 1
        return self._handles[path]

    def release(self, path: Path) -> None:
        fh = self._handles.pop(path, None)
        if fh is not None:
            fh.close()

    def close(self) -> None:
        for path in list(self._handles):
            self.release(path)

    def _header(self, path: Path) -> dict[str, TensorInfo]:
        if path not in self._headers:
            held = self._handles.get(path)
            if held is not None:
                held.seek(0)
                self._headers[path] = _parse_header(path, held)
            else:  # a header-only look (compile time): do not keep the file open
                with open(path, "rb") as fh:
                    self._headers[path] = _parse_header(path, fh)
            self.headers_read.add(path)
        return self._headers[path]

    def info(self, key: str) -> TensorInfo:
        path = self.file_of(key)
        infos = self._header(path)
        if key not in infos:
            raise MscError(f"checkpoint {self.dir}: the index puts tensor '{key}' in {path.name}, which does not hold it")
        return infos[key]

    def shape(self, key: str) -> list[int]:
        return list(self.info(key).shape)

    # ------------------------------------------------------------------ shapes (headers only)
    def _piece_shape(self, piece: Piece) -> list[int]:
        shape = self.shape(piece.key)
        inner = piece.inner_slice
        if inner is not None:
            d, ranges = inner
            d = d % len(shape) if shape else 0
            for a, b in ranges:
                if len(shape) < 2 or d == 0 or not 0 <= a <= b <= shape[d]:
                    what = "columns" if inner[0] == -1 else "dim-1 indices"
                    raise MscError(f"{what} [{a}, {b}) are out of range for checkpoint tensor '{piece.key}' of shape {shape}")
            shape = [*shape[:d], sum(b - a for a, b in ranges), *shape[d + 1:]]
        if piece.rows is None:
            return shape
        a, b = piece.rows
        if not shape or not 0 <= a <= b <= shape[0]:
            raise MscError(f"rows [{a}, {b}) are out of range for checkpoint tensor '{piece.key}' of shape {shape}")
        return [b - a, *shape[1:]]

    def source_shape(self, source: dict) -> list[int]:
        """The shape `build(source)` would have, from headers only (no tensor is read)."""
        stacked, groups = source_groups(source)
        if not stacked:
            shapes = [self._piece_shape(p) for p in groups[0]]
            if len(shapes) == 1:
                return shapes[0]
            if any(sh[1:] != shapes[0][1:] for sh in shapes):
                raise MscError(f"the pieces {' + '.join(p.describe() for p in groups[0])} have shapes {shapes}; a "
                               "concatenation needs the same shape after the first dimension")
            return [sum(sh[0] for sh in shapes), *shapes[0][1:]]
        if not groups:
            raise MscError("a stack weight source has no groups")
        shapes = [[self._piece_shape(p) for p in group] for group in groups]
        rest, rows = shapes[0][0][1:], sum(s[0] for s in shapes[0])
        for group, group_shapes in zip(groups, shapes):
            for p, s in zip(group, group_shapes):
                if s[1:] != rest:
                    raise MscError(f"checkpoint tensor {p.describe()} has shape {s}; the stack needs [*, {', '.join(map(str, rest))}] "
                                   f"like {groups[0][0].describe()}")
            if sum(s[0] for s in group_shapes) != rows:
                raise MscError(f"the stack group {' + '.join(p.describe() for p in group)} has "
                               f"{sum(s[0] for s in group_shapes)} rows; the first group has {rows}")
        return [len(groups), rows, *rest]

    def source_nbytes(self, source: dict) -> int:
        """The bytes `build(source)` reads from disk (headers only)."""
        if "constant" in source:
            return 0
        total = 0
        for group in source_groups(source)[1]:
            for p in group:
                info = self.info(p.key)
                total += math.prod(self._piece_shape(p)) * info.dtype.itemsize
        return total

    def check(self, target: str, source: dict, shape: list[int], where: str = "",
              constants: dict[str, torch.Tensor] | None = None) -> None:
        """Raise one clear MscError when `source` is missing from the checkpoint or does not give `shape`."""
        ctx = f"cannot load parameter '{target}'{where}"
        try:
            if "constant" in source:
                if constants is None or source["constant"] not in constants:
                    raise MscError(f"the bundle's constants.safetensors has no '{source['constant']}'")
                have = list(constants[source["constant"]].shape)
            else:
                have = self.source_shape(source)
        except MscError as e:
            raise MscError(f"{ctx}: {e} (expected {describe_source(source)} to give shape {list(shape)})") from None
        if have != list(shape):
            raise MscError(f"{ctx}: {describe_source(source)} gives shape {have}, expected {list(shape)} "
                           f"(checkpoint {self.dir})")

    # ------------------------------------------------------------------ reading
    def read(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        return self.build({"key": key, "rows": list(rows)} if rows is not None else {"key": key})

    def build(self, source: dict, constants: dict[str, torch.Tensor] | None = None, *, dtype: torch.dtype | None = None,
              on_read: Callable[[int], None] | None = None) -> torch.Tensor:
        """Materialise one graph parameter from its weight source (see module docstring), on the CPU.

        dtype: the result's dtype (default: the checkpoint's); pieces are converted one at a time.
        on_read: called with the byte count of every read (a progress bar).
        """
        if "constant" in source:
            if constants is None or source["constant"] not in constants:
                raise MscError(f"bundle constant '{source['constant']}' is missing")
            t = constants[source["constant"]]
            return t if dtype is None else t.to(dtype)
        stacked, groups = source_groups(source)
        shape = self.source_shape(source)
        out = torch.empty(shape, dtype=dtype or self.info(groups[0][0].key).dtype)  # [G, R, ...] or [R, ...]
        for g, group in enumerate(groups):
            dest = out[g] if stacked else out  # [R, ...]
            row = 0
            for p in group:
                n = self._piece_shape(p)[0] if dest.dim() else 1
                self._read_piece(p, dest[row : row + n] if dest.dim() else dest, on_read)
                row += n
        return out

    def _read_piece(self, piece: Piece, out: torch.Tensor, on_read: Callable[[int], None] | None) -> None:
        """Read `piece` into `out` (a contiguous view of the result), converting dtype if they differ."""
        info = self.info(piece.key)
        start = piece.rows[0] if piece.rows is not None else 0
        nbytes = out.numel() * info.dtype.itemsize
        # NOTE: when the dtypes agree the bytes land in the result itself; otherwise one piece-sized
        # temporary holds them for the conversion, so the peak stays the role's bytes + one tensor.
        buf = out if out.dtype == info.dtype else torch.empty(out.shape, dtype=info.dtype)
        assert buf.is_contiguous(), "a piece's destination is a run of dim-0 rows of a contiguous tensor"
        if nbytes and piece.inner_slice is not None:
            # NOTE: a slice of an inner dimension is one run per index of the dimensions before it (a tensor-
            # parallel rank's share): strided reads, but only this rank's bytes leave the disk
            fh = self.open(info.path)
            d, ranges = piece.inner_slice
            full = list(info.shape)
            d = d % len(full)
            item = info.dtype.itemsize
            lead = [range(start, start + buf.shape[0])] + [range(n) for n in full[1:d]]
            raw = buf.reshape(-1).view(torch.uint8).numpy()
            pos = 0
            strides = [math.prod(full[k + 1:]) * item for k in range(len(full))]
            for index in itertools.product(*lead):
                base = sum(i * st for i, st in zip(index, strides))
                for a, b in ranges:
                    run = (b - a) * strides[d]
                    fh.seek(info.offset + base + a * strides[d])
                    _readinto_exact(fh, raw[pos:pos + run], run, piece.key, info.path)
                    pos += run
        elif nbytes:
            fh = self.open(info.path)
            fh.seek(info.offset + start * info.row_bytes)
            _readinto_exact(fh, buf.reshape(-1).view(torch.uint8).numpy(), nbytes, piece.key, info.path)
        if buf is not out:
            out.copy_(buf)
        self.bytes_read += nbytes
        self.keys_read[piece.key] += 1
        if on_read is not None:
            on_read(nbytes)


def _parse_header(path: Path, fh: BinaryIO) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file: 8-byte little-endian header length, JSON header, data."""
    head = fh.read(8)
    if len(head) != 8:
        raise MscError(f"{path} is not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > _MAX_HEADER:
        raise MscError(f"{path} is not a safetensors file (header length {n})")
    try:
        header = json.loads(fh.read(n))
    except ValueError as e:
        raise MscError(f"{path} has a corrupt safetensors header: {e}") from None
    data = 8 + n
    infos = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        if meta["dtype"] not in _DTYPES:
            raise MscError(f"{path}: tensor '{key}' has dtype {meta['dtype']}, which msc cannot read")
        dtype, shape = _DTYPES[meta["dtype"]], tuple(meta["shape"])
        begin, end = meta["data_offsets"]
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise MscError(f"{path}: tensor '{key}' of shape {list(shape)} {meta['dtype']} spans {end - begin} bytes")
        infos[key] = TensorInfo(path, dtype, shape, data + begin, end - begin)
    return infos


def _readinto_exact(fh: BinaryIO, buf, nbytes: int, key: str, path: Path) -> None:
    view = memoryview(buf).cast("B")
    got = 0
    while got < nbytes:
        k = fh.readinto(view[got:nbytes])
        if not k:
            raise MscError(f"{path} ends inside tensor '{key}' (truncated checkpoint)")
        got += k


# ---------------------------------------------------------------------- streaming a weight map
@dataclass(frozen=True)
class WeightEntry:
    """One parameter of a role's weight map: where it comes from and what it must be."""

    target: str
    source: dict
    shape: list[int]
    dtype: torch.dtype


def stream_order(reader: CheckpointReader, entries: Iterable[WeightEntry],
                 label: str = "weights") -> tuple[list[WeightEntry], dict[Path, int]]:
    """Entries grouped by the shards they read, and for each shard the index of the last entry reading it.

    NOTE: entries are sorted by the (sorted) tuple of shard files they read, so all entries of one shard
    come together and a shard can be closed for good after its last entry; an entry spanning two shards
    (a stack whose experts straddle a shard boundary) keeps both open until it is built.
    """
    entries = list(entries)
    files = {e.target: _files(reader, e, label) for e in entries}
    ordered = sorted(entries, key=lambda e: tuple(str(f) for f in files[e.target]))  # stable
    last = {f: i for i, e in enumerate(ordered) for f in files[e.target]}
    return ordered, last


def _files(reader: CheckpointReader, e: WeightEntry, label: str) -> list[Path]:
    try:
        return sorted(reader.files_of(e.source))
    except MscError:
        reader.check(e.target, e.source, e.shape, f" of {label}")  # raises the same error, naming the parameter
        raise


def stream_load(reader: CheckpointReader, entries: list[WeightEntry], device: str | torch.device = "cpu", *,
                constants: dict[str, torch.Tensor] | None = None, label: str = "weights",
                progress: bool | None = None) -> dict[str, torch.Tensor]:
    """Build every entry's tensor on `device`, shard by shard, each shard opened once and closed when done.

    Every entry is checked against the headers before any tensor byte is read. progress: a byte-counting
    bar on stderr (None: only when stderr is a terminal).
    """
    device = torch.device(device)
    ordered, last = stream_order(reader, entries, label)
    for path in sorted(last):  # NOTE: open each needed shard once, up front: its header comes from the same handle
        reader.open(path)
    for e in ordered:
        reader.check(e.target, e.source, e.shape, f" of {label}", constants)
    total = sum(reader.source_nbytes(e.source) for e in ordered)
    out: dict[str, torch.Tensor] = {}
    with _ProgressBar(label, total, progress) as advance:
        for i, e in enumerate(ordered):
            t = reader.build(e.source, constants, dtype=e.dtype, on_read=advance)  # CPU, final dtype
            out[e.target] = t.to(device)  # no copy on the CPU; on a GPU the CPU tensor is dropped here
            del t
            for path in [p for p, j in last.items() if j == i]:
                reader.release(path)
    return out


class _ProgressBar:
    """A transient rich progress bar counting bytes on stderr; a no-op off a terminal (role logs stay clean)."""

    def __init__(self, label: str, total: int, enabled: bool | None):
        from rich.console import Console

        console = Console(stderr=True)
        self.enabled = console.is_terminal if enabled is None else enabled
        self.label, self.total, self.console, self._progress = label, total, console, None

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n: None
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

        # NOTE: transient: several role processes may share one terminal; a finished bar is erased
        # rather than left interleaved with the other roles' output.
        self._progress = Progress(TextColumn("loading {task.description}"), BarColumn(), DownloadColumn(),
                                  TransferSpeedColumn(), TimeRemainingColumn(), console=self.console, transient=True)
        self._progress.start()
        task = self._progress.add_task(self.label, total=self.total)
        return lambda n: self._progress.advance(task, n)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()


__all__ = [
    "INDEX", "SINGLE", "CheckpointReader", "Piece", "TensorInfo", "WeightEntry", "describe_source",
    "materialize_random", "source_groups", "stream_load", "stream_order",
]


# ---------------------------------------------------------------------- what a bundle expects of a checkpoint
EXPECTED_FILE = "checkpoint.json"  # in a bundle: {"config": {...} | None, "tensors": {key: [dtype, shape]}}

# NOTE: config.json keys that do not change what a bundle computes or which tensors it reads: names,
# versions, token ids (the manifest keeps its own eos), training-only settings, runtime flags. Every other
# key both config.json files hold must agree; a key only one of them holds (a newer transformers writes
# another set) is not compared, since the tensors are checked one by one anyway.
_CONFIG_IGNORED = {"_name_or_path", "transformers_version", "architectures", "torch_dtype", "dtype", "use_cache",
                   "return_dict", "initializer_range", "output_router_logits", "router_aux_loss_coef",
                   "router_jitter_noise", "auto_map", "_attn_implementation", "_commit_hash"}


def _config_key_matters(key: str) -> bool:
    return not (key in _CONFIG_IGNORED or key.endswith(("_token_id", "_token_ids")) or "dropout" in key
                or key.startswith("output_"))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _read_config(directory: Path) -> dict | None:
    """The checkpoint's config.json as a dict, or None when it has none; MscError when it is not JSON."""
    path = directory / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MscError(f"checkpoint {directory}: config.json cannot be read as JSON ({str(e)[:80]})") from None
    if not isinstance(data, dict):
        raise MscError(f"checkpoint {directory}: config.json is not a JSON object")
    return data


def checkpoint_expectations(reader: CheckpointReader, sources: Iterable[dict]) -> dict:
    """What a bundle needs of a checkpoint, from the one it was compiled against: every tensor its weight
    sources read (name -> [dtype, shape of the whole tensor], in the order first read) and the config.json
    keys that matter (None when that checkpoint had no config.json: a module saved by msc.compile)."""
    tensors: dict[str, list] = {}
    for source in sources:
        if "constant" in source:
            continue
        for group in source_groups(source)[1]:
            for p in group:
                if p.key not in tensors:
                    info = reader.info(p.key)
                    tensors[p.key] = [_dtype_name(info.dtype), list(info.shape)]
    config = _read_config(reader.dir)
    if config is not None:
        config = {k: v for k, v in config.items() if _config_key_matters(k)}
    return {"config": config, "tensors": tensors}


def check_checkpoint(directory: str | Path, expected: dict) -> Path:
    """The checkpoint folder `directory` (absolute) once it gives what `expected` (checkpoint_expectations of
    the bundle) needs; MscError naming the first difference otherwise. Reads config.json and the safetensors
    headers only, no tensor data."""
    directory = Path(directory).absolute()
    where = f"checkpoint {directory}"
    if not directory.exists():
        raise MscError(f"{where} does not exist; expected a Hugging Face checkpoint folder")
    if not directory.is_dir():
        raise MscError(f"{where} is not a folder; expected a Hugging Face checkpoint folder")
    want_config = expected.get("config")
    if want_config is not None:
        have = _read_config(directory)
        if have is None:
            raise MscError(f"{where} has no config.json; the bundle expects a {want_config.get('model_type')} "
                           "checkpoint with its config.json")
        if "model_type" in want_config and have.get("model_type") != want_config["model_type"]:
            raise MscError(f"{where}: config.json has model_type {have.get('model_type')!r}, the bundle expects "
                           f"{want_config['model_type']!r}")
        for key, value in want_config.items():
            if key in have and have[key] != value:
                raise MscError(f"{where}: config.json has {key} {json.dumps(have[key])}, the bundle expects "
                               f"{json.dumps(value)}")
    with CheckpointReader(directory) as reader:  # MscError when the folder holds no safetensors
        for key, (dtype, shape) in expected["tensors"].items():
            if key not in reader.key_to_file:
                raise MscError(f"{where} has no tensor {key}, which the bundle reads")
            try:
                info = reader.info(key)
            except OSError as e:  # a shard the index names is missing or unreadable
                raise MscError(f"{where}: cannot read {e.filename or reader.key_to_file[key]}: {e.strerror}") from None
            if list(info.shape) != list(shape):
                raise MscError(f"{where}: tensor {key} has shape {list(info.shape)}, the bundle expects {list(shape)}")
            if _dtype_name(info.dtype) != dtype:
                raise MscError(f"{where}: tensor {key} has dtype {_dtype_name(info.dtype)}, the bundle expects {dtype}")
    return directory
