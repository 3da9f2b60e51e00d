"""Declared sharding: logical axes → mesh axes, meshes from strings, params and KV cache placed on them.

Every array dimension jaxspec allocates has a *logical* axis (``TOP_AXES``, ``LAYER_AXES``, ``CACHE_AXES``);
``ShardingRules`` maps logical axes to mesh axes once, for every pipeline. The defaults are tensor
parallelism on ``model`` (query/kv heads, MLP hidden units, vocabulary: the Megatron split, one
all-reduce after ``o_proj`` and one after ``down_proj`` per layer) and data parallelism on ``data``
(the batch). The KV cache is sharded by kv heads, then batch; weights are never split along ``embed``
(no FSDP at decode: it would re-gather every weight every step). ``jax.jit`` follows the input
shardings (GSPMD), so no pipeline needs hand-written collectives.

A dimension that its mesh axes do not divide (e.g. Qwen2.5's 2 kv heads over ``model=4``) is
replicated over those axes, never padded; ``sharding_notes`` says which. Head axes are judged by their
head count (``q_proj`` rows are ``heads × head_dim``), so a head is never split across devices.

Multi-host: host data becomes global arrays through ``jax.make_array_from_callback`` (each process
materialises only its own shards) and results come back through ``to_host``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxspec.cache import KVCache
from jaxspec.models.config import ModelConfig

MeshAxes = str | tuple[str, ...] | None

# Logical axes of each parameter leaf; matrices are [out, in]. Layer weights are listed by their path
# inside a layer: stacked (``layers/...``) they get a leading "layers" axis, per-layer (``layers_{i}/...``)
# they keep these.
TOP_AXES: dict[str, tuple[str, ...]] = {
    "embed_tokens/embedding": ("vocab", "embed"),
    "lm_head/weight": ("vocab", "embed"),
    "norm/scale": ("embed",),
}
LAYER_AXES: dict[str, tuple[str, ...]] = {
    "input_layernorm/scale": ("embed",),
    "post_attention_layernorm/scale": ("embed",),
    "self_attn/q_proj/weight": ("q_heads", "embed"),
    "self_attn/k_proj/weight": ("kv_heads", "embed"),
    "self_attn/v_proj/weight": ("kv_heads", "embed"),
    "self_attn/o_proj/weight": ("embed", "q_heads"),
    "self_attn/q_proj/bias": ("q_heads",),
    "self_attn/k_proj/bias": ("kv_heads",),
    "self_attn/v_proj/bias": ("kv_heads",),
    "self_attn/q_norm/scale": ("head_dim",),
    "self_attn/k_norm/scale": ("head_dim",),
    "mlp/gate_proj/weight": ("ffw", "embed"),
    "mlp/up_proj/weight": ("ffw", "embed"),
    "mlp/down_proj/weight": ("embed", "ffw"),
}
CACHE_AXES: dict[str, tuple[str, ...]] = {
    "k": ("layers", "batch", "kv_heads", "cache_seq", "head_dim"),
    "v": ("layers", "batch", "kv_heads", "cache_seq", "head_dim"),
    "pos": ("layers", "batch", "kv_heads", "cache_seq"),
    "length": ("batch",),
}


class ShardingError(ValueError):
    """Rules, a mesh spec or a mesh that cannot be used."""


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis → mesh axis (a name, a tuple of names, or None for replicated).

    Raises ``ShardingError`` when two logical axes of one declared array map to the same mesh axis.
    Mesh axes the mesh lacks (or of size 1) are ignored, so the defaults work on any ``data``/``model``
    mesh. ``ShardingRules.replicated()`` keeps everything whole on every device (the usual choice for
    a small draft model).
    """

    batch: MeshAxes = "data"
    layers: MeshAxes = None
    vocab: MeshAxes = "model"
    embed: MeshAxes = None
    q_heads: MeshAxes = "model"
    kv_heads: MeshAxes = "model"
    head_dim: MeshAxes = None
    ffw: MeshAxes = "model"
    cache_seq: MeshAxes = None

    def __post_init__(self):
        for name, logical in declared_arrays().items():
            self.check(logical, name)

    @classmethod
    def replicated(cls) -> "ShardingRules":
        return cls(**{f.name: None for f in dataclasses.fields(cls)})

    def axes(self, logical: str) -> tuple[str, ...]:
        """The mesh axes of one logical axis (empty: replicated)."""
        try:
            value = getattr(self, logical)
        except AttributeError:
            raise ShardingError(f"unknown logical axis {logical!r}") from None
        return () if value is None else (value,) if isinstance(value, str) else tuple(value)

    def check(self, logical: tuple[str, ...], what: str = "array") -> None:
        """Raise if two logical axes of one array share a mesh axis."""
        seen: dict[str, str] = {}
        for name in logical:
            for ax in self.axes(name):
                if ax in seen:
                    raise ShardingError(f"{what}: logical axes {seen[ax]!r} and {name!r} both map to mesh axis "
                                        f"{ax!r}")
                seen[ax] = name

    def used(self) -> set[str]:
        return {ax for f in dataclasses.fields(self) for ax in self.axes(f.name)}

    def spec(self, logical: tuple[str, ...], shape: tuple[int, ...], sizes: dict[str, int],
             units: dict[str, int] | None = None, notes: dict[str, set[str]] | None = None, what: str = "array") -> P:
        """The ``PartitionSpec`` of an array with these logical axes and shape on a mesh of ``sizes``.

        ``units[axis]`` is what must divide evenly (head counts for head axes; default the dimension);
        a dimension that does not divide is replicated and recorded in ``notes[reason] ∋ what``.
        """
        self.check(logical, what)
        entries = []
        for name, dim in zip(logical, shape, strict=True):
            axes = tuple(a for a in self.axes(name) if sizes.get(a, 1) > 1)
            n = math.prod(sizes[a] for a in axes)
            count = (units or {}).get(name, dim)
            if axes and count % n:
                if notes is not None:
                    reason = f"{name} ({count}) does not divide over {'×'.join(axes)}={n}: replicated"
                    notes.setdefault(reason, set()).add(what)
                axes = ()
            entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        return P(*entries)


def declared_arrays() -> dict[str, tuple[str, ...]]:
    """Every declared array's logical axes (stacked parameter layout and the KV cache)."""
    out = dict(TOP_AXES)
    out.update({f"layers/{p}": ("layers",) + a for p, a in LAYER_AXES.items()})
    out.update({f"cache/{k}": a for k, a in CACHE_AXES.items()})
    return out


def param_axes(path: str) -> tuple[str, ...]:
    """Logical axes of a parameter leaf ``path`` ("a/b/c"), in either layout: stacked ``layers/...``
    (leading "layers" axis) or per-layer ``layers_{i}/...``."""
    head, _, rest = path.partition("/")
    if path in TOP_AXES:
        return TOP_AXES[path]
    if head == "layers" and rest in LAYER_AXES:
        return ("layers",) + LAYER_AXES[rest]
    if re.fullmatch(r"layers_\d+", head) and rest in LAYER_AXES:
        return LAYER_AXES[rest]
    raise ShardingError(f"no logical axes declared for parameter {path!r}")


def _units(cfg: ModelConfig) -> dict[str, int]:
    return {"q_heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads}


def _path(keys) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in keys)


def mesh_sizes(mesh: Mesh | dict[str, int] | None) -> dict[str, int]:
    return {} if mesh is None else dict(mesh) if isinstance(mesh, dict) else dict(mesh.shape)


def param_specs(params, cfg: ModelConfig, mesh, rules: ShardingRules | None = None, notes=None):
    """``PartitionSpec`` pytree for ``params`` (arrays or ``ShapeDtypeStruct``s, either layout) on
    ``mesh`` (a ``Mesh`` or a ``{axis: size}`` dict)."""
    rules, sizes = rules or ShardingRules(), mesh_sizes(mesh)
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: rules.spec(param_axes(_path(kp)), x.shape, sizes, _units(cfg), notes, _path(kp)), params)


def cache_specs(cfg: ModelConfig, batch: int, capacity: int, mesh, rules: ShardingRules | None = None,
                notes=None) -> KVCache:
    """A ``KVCache`` of ``PartitionSpec``s for a cache of this batch and capacity."""
    rules, sizes = rules or ShardingRules(), mesh_sizes(mesh)
    shapes = jax.eval_shape(lambda: KVCache.create(cfg, batch, capacity))
    return KVCache(**{k: rules.spec(CACHE_AXES[k], getattr(shapes, k).shape, sizes, _units(cfg), notes, f"cache/{k}")
                      for k in CACHE_AXES})


def sharding_notes(cfg: ModelConfig, mesh, rules: ShardingRules | None = None, batch: int | None = None) -> list[str]:
    """What ``rules`` cannot shard for this model on this mesh (replicated instead), one line per reason."""
    from jaxspec.models.transformer import param_shapes

    rules, notes = rules or ShardingRules(), {}
    param_specs(param_shapes(cfg), cfg, mesh, rules, notes)
    if batch is not None:
        cache_specs(cfg, batch, 1, mesh, rules, notes)
    out = [f"{reason} ({', '.join(sorted(arrays))})" for reason, arrays in sorted(notes.items())]
    idle = [f"{a}={n}" for a, n in mesh_sizes(mesh).items() if n > 1 and a not in rules.used()]
    if idle:  # e.g. a misspelt --mesh axis
        out.append(f"mesh axes {', '.join(idle)} are used by no sharding rule: everything is replicated over them")
    return out


def _named(mesh: Mesh, specs):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def param_shardings(params, cfg: ModelConfig, mesh: Mesh, rules: ShardingRules | None = None):
    """``NamedSharding`` pytree for ``params`` (arrays or shapes, either layout)."""
    return _named(mesh, param_specs(params, cfg, mesh, rules))


def cache_shardings(cfg: ModelConfig, batch: int, mesh: Mesh, rules: ShardingRules | None = None) -> KVCache:
    return _named(mesh, cache_specs(cfg, batch, 1, mesh, rules))


# ---------------------------------------------------------------------------------------------- placement
def put(x, sharding: NamedSharding) -> jax.Array:
    """Place ``x`` (numpy, a local array or a global array) on ``sharding``. With several processes,
    host data must be the same on every process; each process copies only its own shards."""
    if isinstance(x, jax.Array) and (jax.process_count() == 1 or not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_params(params, cfg: ModelConfig, mesh: Mesh, rules: ShardingRules | None = None):
    """``params`` with every leaf on its ``NamedSharding`` (leaves already there are left as they are)."""
    return jax.tree.map(put, params, param_shardings(params, cfg, mesh, rules))


def param_put(cfg: ModelConfig, mesh: Mesh, rules: ShardingRules | None = None):
    """A ``put(path, np_array)`` hook for ``conversion.hf.load_hf_params``: each converted leaf goes
    straight onto its ``NamedSharding`` (params born sharded, never whole on one device)."""
    rules = rules or ShardingRules()
    return lambda path, a: put(a, NamedSharding(mesh, rules.spec(param_axes(path), a.shape, mesh_sizes(mesh),
                                                                     _units(cfg), what=path)))


def create_cache(cfg: ModelConfig, batch: int, capacity: int, mesh: Mesh, rules: ShardingRules | None = None,
                 dtype=None) -> KVCache:
    """``KVCache.create``, allocated directly in its shards (batch over ``data``, kv heads over ``model``)."""
    shardings = cache_shardings(cfg, batch, mesh, rules)
    make = jax.jit(lambda: KVCache.create(cfg, batch, capacity, dtype), out_shardings=shardings)
    return make()


def place_args(args: tuple, mesh: Mesh, rules: ShardingRules | None = None, batched: tuple[int, ...] = ()) -> tuple:
    """Put the host values of a jitted call's ``args`` on ``mesh``: ``args[i]`` for ``i in batched`` split
    on their leading (batch) axis, the rest replicated; args already on ``mesh`` are left alone."""
    rules, sizes = rules or ShardingRules(), mesh_sizes(mesh)

    def on_mesh(a):
        return all(isinstance(getattr(x, "sharding", None), NamedSharding) and x.sharding.mesh == mesh
                   for x in jax.tree.leaves(a))

    def place(x, split):
        return put(x, NamedSharding(mesh, rules.spec(("batch",), np.shape(x)[:1], sizes) if split else P()))

    return tuple(a if on_mesh(a) else jax.tree.map(lambda x, s=i in batched: place(x, s), a)
                 for i, a in enumerate(args))


def to_host(x) -> np.ndarray:
    """A (possibly multi-process) array as one numpy array on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


# ---------------------------------------------------------------------------------------------- meshes
def parse_mesh(spec: str | dict[str, int] | None, num_devices: int | None = None) -> dict[str, int]:
    """``"data=2,model=4"`` → ``{"data": 2, "model": 4}``. One axis may be ``-1``: the devices left over
    (needs ``num_devices``). ``None`` or ``""``: the default, all devices on ``model`` within a process
    and processes on ``data`` (tensor parallel inside a host, data parallel across hosts)."""
    if not spec:
        if num_devices is None:
            return {"data": 1, "model": 1}
        return {"data": jax.process_count(), "model": num_devices // jax.process_count()}
    if isinstance(spec, str):
        sizes = {}
        for part in spec.replace(" ", "").split(","):
            m = re.fullmatch(r"([A-Za-z_]\w*)=(-1|\d+)", part)
            if not m or m.group(1) in sizes:
                raise ShardingError(f"mesh spec must look like 'data=2,model=4' (distinct axes), got {spec!r}")
            sizes[m.group(1)] = int(m.group(2))
    else:
        sizes = dict(spec)
    if any(n == 0 or n < -1 for n in sizes.values()) or list(sizes.values()).count(-1) > 1:
        raise ShardingError(f"mesh axis sizes must be positive (one may be -1), got {sizes}")
    if -1 in sizes.values():
        known = math.prod(n for n in sizes.values() if n != -1)
        if num_devices is None or num_devices % known:
            raise ShardingError(f"cannot infer the -1 axis of {sizes} for {num_devices} devices")
        sizes = {a: num_devices // known if n == -1 else n for a, n in sizes.items()}
    return sizes


def make_mesh(spec: str | dict[str, int] | None = None, devices=None) -> Mesh:
    """A ``jax.sharding.Mesh`` from ``"data=2,model=4"`` (see ``parse_mesh``) over ``devices``
    (default: all devices of all processes). Axes are ``Auto``: jit and GSPMD propagate the shardings.
    A mesh smaller than the device count uses the first devices (one process only)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec, len(devices))
    n = math.prod(sizes.values())
    if n > len(devices) or (n < len(devices) and jax.process_count() > 1):
        raise ShardingError(f"mesh {sizes} needs {n} devices; there are {len(devices)}")
    return jax.make_mesh(tuple(sizes.values()), tuple(sizes), axis_types=(AxisType.Auto,) * len(sizes),
                         devices=devices[:n])


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, timeout_s: int = 300) -> None:
    """``jax.distributed.initialize``. Unset arguments come from ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``, else from JAX's cluster auto-detection (TPU pod
    slices, SLURM, Open MPI, Kubernetes). Call it before anything touches a device."""
    env = os.environ.get
    num_processes = num_processes if num_processes is not None else _int(env("JAX_NUM_PROCESSES"))
    process_id = process_id if process_id is not None else _int(env("JAX_PROCESS_ID"))
    jax.distributed.initialize(coordinator or env("JAX_COORDINATOR_ADDRESS"), num_processes, process_id,
                               initialization_timeout=timeout_s)


def _int(s: str | None) -> int | None:
    return None if s is None else int(s)


# ---------------------------------------------------------------------------------------------- CLI
def mesh_from_args(args) -> Mesh | None:
    """For the CLI's ``--mesh``, ``--distributed``, ``--coordinator``, ``--num-processes``, ``--process-id``:
    initialise ``jax.distributed`` if asked, then the mesh of ``--mesh`` (or the default mesh when
    there is more than one device); ``None`` for one device and no ``--mesh``."""
    if args.distributed:
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    elif args.coordinator or args.num_processes is not None or args.process_id is not None:
        raise ShardingError("--coordinator, --num-processes and --process-id need --distributed")
    if args.mesh is None and jax.device_count() == 1:
        return None
    return make_mesh(args.mesh)
