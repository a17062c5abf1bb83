"""Write and read a megamoe checkpoint's model/ directory one layer at a time.

A megamoe checkpoint's model/ is megatron-core dist_checkpointing (torch_dist backend, i.e.
PyTorch DCP files) of the world-1 model's sharded state dict; ``checkpoint.save`` writes it from
a model held in memory and ``checkpoint.load_model`` reads it at any layout. The converter must
not hold the model (28 GB for LLaMA-7B in fp32), so here:

- the layout comes from the model built on the meta device (``meta_model``): its sharded state
  dict has every checkpoint key, shape, offset and ShardedObject exactly as ``checkpoint.save``
  writes them, at no memory cost;
- every ShardedTensor of that dict is a parameter or a view of one (layers stacked on a
  prepended axis, GLU halves, one slice per expert), so a ``Piece`` keeps the parameter's name
  and the view (size, stride, storage offset): the data of a piece is that view of the real
  parameter, which exists only while its layer is written or read;
- ``save_streaming`` runs dist_checkpointing.save (validation, common.pt, metadata.json) with a
  save strategy that writes through torch.distributed.checkpoint serially, ordering the items
  by layer and producing each item's data when the writer reaches it;
- ``CheckpointReader`` loads one layer's pieces per dist_checkpointing.load call, so reading
  reshards exactly like ``checkpoint.load_model``.

This relies on internals of megatron-core 0.16.1's torch_dist strategy (imported through
parallel/mcore.py) and of torch.distributed.checkpoint's file writer;
tests/convert/test_convert_streaming.py checks the files against ``checkpoint.save``'s.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections import Counter
from collections.abc import Iterable

import torch
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint import filesystem as _fs
from torch.distributed.checkpoint.planner import WriteItem, WriteItemType
from torch.futures import Future

from ..config import ModelConfig, MoEConfig
from ..parallel.mcore import ShardedTensor, apply_factories, dist_checkpointing, nested_values
from ..parallel.mcore import torch_dist_strategy as _torch_strategy

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.")


class StreamError(ValueError):
    """The stream of tensors does not fit the model (a converter bug, or a bad source)."""


def meta_model(
    m: ModelConfig, moe: MoEConfig | None = None, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """``build_model(m, moe, dtype=dtype)`` of a world of one on the meta device: the shapes and
    checkpoint layout without memory or initialisation. parallel.initialize() first."""
    from ..model import llama

    return llama.build_model(m, moe, dtype=dtype, meta=True)


def layer_group(name: str, num_layers: int) -> int:
    """Write/read order of a parameter: 0 embedding, 1 + i decoder layer i, then the rest."""
    mm = _LAYER.match(name)
    if mm:
        return 1 + int(mm.group(1))
    return 0 if name.startswith("embedding.") else num_layers + 1


@dataclasses.dataclass
class Piece:
    """One ShardedTensor of the checkpoint: the view (size, stride, storage offset) of `param`."""

    sharded: ShardedTensor
    param: str
    size: tuple
    stride: tuple
    offset: int

    @property
    def index(self) -> tuple[str, tuple]:
        return self.sharded.key, tuple(self.sharded.global_offset)

    def view(self, full: torch.Tensor) -> torch.Tensor:
        return full.as_strided(self.size, self.stride, self.offset)


def _sharded_pieces(model: torch.nn.Module) -> tuple[dict, list[Piece]]:
    """The model's sharded state dict (factories applied) and its pieces."""
    names = {id(p): n for n, p in model.named_parameters()}
    sd = model.sharded_state_dict()
    apply_factories(sd)
    pieces = []
    for sh in nested_values(sd):
        if not isinstance(sh, ShardedTensor):
            continue  # ShardedObjects (_extra_state) are written as the meta model holds them
        d = sh.data
        name = names.get(id(d if d._base is None else d._base))
        if name is None:
            raise StreamError(
                f"checkpoint tensor {sh.key} is neither a parameter nor a view of "
                "one; the streaming converter cannot produce it"
            )
        pieces.append(Piece(sh, name, tuple(d.shape), tuple(d.stride()), d.storage_offset()))
    return sd, pieces


# --------------------------------------------------------------------------------------------
# writing


class _StreamSource:
    """Serves each write item's data from a stream of (parameter name, full tensor) pairs in
    layer order, keeping a tensor only until all of its pieces are written."""

    def __init__(
        self, model: torch.nn.Module, pieces: list[Piece], items: Iterable[tuple[str, torch.Tensor]]
    ):
        self.params = dict(model.named_parameters())
        rank = {n: i for i, n in enumerate(self.params)}
        layers = len(model.decoder.layers)
        self.by_index = {p.index: p for p in pieces}
        self.rank = {p.index: (layer_group(p.param, layers), rank[p.param]) for p in pieces}
        self.left = Counter(p.param for p in pieces)
        self.ready: dict[str, torch.Tensor] = {}
        self.seen: set[str] = set()
        self.items = iter(items)
        self.error: BaseException | None = None  # the first failure inside the DCP writer

    def order(self, item: WriteItem) -> tuple:
        if item.type == WriteItemType.BYTE_IO:
            return (-1, 0)
        return self.rank[(item.index.fqn, tuple(item.index.offset))]

    def data(self, item: WriteItem) -> torch.Tensor:
        try:
            piece = self.by_index[(item.index.fqn, tuple(item.index.offset))]
            out = piece.view(self._take(piece.param)).contiguous()
            self.left[piece.param] -= 1
            if not self.left[piece.param]:
                del self.ready[piece.param]
            return out.view(item.tensor_data.chunk.sizes)  # with megatron-core's prepended axes
        except BaseException as e:
            self.error = self.error or e
            raise

    def _take(self, name: str) -> torch.Tensor:
        while name not in self.ready:
            try:
                n, t = next(self.items)
            except StopIteration:
                raise StreamError(
                    f"internal: parameter {name} was not produced from the source"
                ) from None
            self._accept(n, t)
        return self.ready[name]

    def _accept(self, name: str, t: torch.Tensor) -> None:
        p = self.params.get(name)
        if p is None:
            raise StreamError(f"internal: no parameter {name} in the megamoe model")
        if name in self.seen:
            raise StreamError(f"internal: parameter {name} produced twice")
        if tuple(p.shape) != tuple(t.shape):
            raise StreamError(
                f"{name}: shape {list(t.shape)} does not fit the model's {list(p.shape)}"
            )
        self.seen.add(name)
        self.ready[name] = t.detach().to(p.dtype).contiguous()

    def finish(self) -> None:
        for n, t in self.items:  # whatever is left is an error (unknown or repeated)
            self._accept(n, t)


class _Planner(_torch_strategy.MCoreSavePlanner):
    def __init__(self, source: _StreamSource):
        super().__init__(dedup_replicated_tensors=False, flatten_state_dict=False)
        self.source = source

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        return self.source.data(write_item)


class _Writer(dcp.FileSystemWriter):
    """One file, in layer order, one item in memory at a time: torch's own write loop keeps
    every tensor it wrote until the file is complete (the whole model)."""

    def __init__(self, path: str, source: _StreamSource):
        super().__init__(path, single_file_per_rank=True, thread_count=1)
        self.source = source

    def write_data(self, plan, planner) -> Future:
        name = f"{plan.storage_data.prefix}0{_fs.DEFAULT_SUFFIX}"
        results = []
        with self.fs.create_stream(self.fs.concat_path(self.path, name), "wb") as stream:
            for item in sorted(plan.items, key=self.source.order):
                data = planner.resolve_data(item)
                if torch.is_tensor(data) and data.untyped_storage().nbytes() != data.nbytes:
                    data = data.clone()  # torch.save writes a view's whole storage
                results.append(
                    _fs._write_item(
                        self.transforms, stream, data, item, name, self.serialization_format
                    )
                )
                del data
            if self.sync_files:
                os.fsync(stream.fileno())
        done: Future = Future()
        done.set_result(results)
        return done


class _StreamingStrategy(_torch_strategy.TorchDistSaveShardedStrategy):
    """torch_dist version 1 (what the default strategy records), written synchronously."""

    def __init__(self, source: _StreamSource):
        super().__init__("torch_dist", 1, thread_count=1)
        self.source = source

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        sd, _, _ = _torch_strategy._replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, self.keep_only_main_replica
        )
        state = _torch_strategy.mcore_to_pyt_state_dict(sd, False)
        dcp.save(
            state,
            storage_writer=_Writer(str(checkpoint_dir), self.source),
            planner=_Planner(self.source),
        )


def save_streaming(
    model: torch.nn.Module, path: str | os.PathLike, items: Iterable[tuple[str, torch.Tensor]]
) -> None:
    """Write the model/ directory of a megamoe checkpoint for `model` (a ``meta_model``) with
    the data of `items`: (parameter name, full tensor) for every parameter once, in layer
    order (embedding, layer 0, 1, ..., the rest), cast to the parameter's dtype. Holds about one
    layer of tensors. An exception raised by `items` propagates unchanged."""
    sd, pieces = _sharded_pieces(model)
    source = _StreamSource(model, pieces, items)
    os.makedirs(path, exist_ok=True)
    try:
        dist_checkpointing.save(sd, str(path), sharded_strategy=_StreamingStrategy(source))
    except BaseException:
        if source.error is not None:  # DCP wraps writer failures; report the original
            raise source.error from None
        raise
    source.finish()


# --------------------------------------------------------------------------------------------
# reading


class CheckpointReader:
    """The full parameters of a megamoe checkpoint, loaded a layer at a time: ``get(name)``
    with names in layer order (as formats/hf_llama.megamoe_to_hf asks for them) keeps one
    layer in memory. `model` is a ``meta_model`` of the checkpoint's configuration (fp32
    reads as ``checkpoint.load_model`` into ``build_model`` does)."""

    def __init__(self, model: torch.nn.Module, path: str | os.PathLike):
        self.path = os.path.join(str(path), "model")
        self.params = dict(model.named_parameters())
        self.layers = len(model.decoder.layers)
        self.groups: dict[int, list[Piece]] = {}
        for p in _sharded_pieces(model)[1]:
            self.groups.setdefault(layer_group(p.param, self.layers), []).append(p)
        self.group: int | None = None
        self.loaded: dict[str, torch.Tensor] = {}

    def missing_keys(self) -> list[str]:
        """The model's checkpoint keys that the checkpoint lacks (another model type?)."""
        stored = dcp.FileSystemReader(self.path).read_metadata().state_dict_metadata
        return sorted({p.sharded.key for ps in self.groups.values() for p in ps} - set(stored))

    def get(self, name: str) -> torch.Tensor:
        g = layer_group(name, self.layers)
        if g != self.group:
            self.loaded = {}  # free the previous layer first
            self.loaded, self.group = self._load(g), g
        return self.loaded[name]

    def _load(self, g: int) -> dict[str, torch.Tensor]:
        pieces = self.groups.get(g, [])
        full = {
            p.param: torch.empty(self.params[p.param].shape, dtype=self.params[p.param].dtype)
            for p in pieces
        }
        views = [p.view(full[p.param]) for p in pieces]
        request = {str(i): _as_chunk(p.sharded, v) for i, (p, v) in enumerate(zip(pieces, views))}
        # one layer is part of the stacked tensors: no whole-tensor access check
        state = dist_checkpointing.load(request, self.path, validate_access_integrity=False)
        for i, v in enumerate(views):
            t = state[str(i)]
            if t.data_ptr() != v.data_ptr():  # loaded into a copy (a non-contiguous view)
                v.copy_(t.reshape(v.shape))
        return full


def _as_chunk(sh: ShardedTensor, data: torch.Tensor) -> ShardedTensor:
    """`sh` with `data`, its prepended (layer) axes made ordinary axes of size 1: megatron-core
    reads a stacked tensor's prepended-axis shards as one regular grid, which at world size 1
    must be complete, but reads plain chunks one by one."""
    n = sh.prepend_axis_num
    return dataclasses.replace(
        sh, data=data[(None,) * n], prepend_axis_num=0, local_shape=(1,) * n + tuple(sh.local_shape)
    )
