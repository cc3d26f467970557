"""``get_state`` / ``set_state``: one stageable object for a model and its optimizers.

The model and optimizer state dicts come from PyTorch's distributed
state-dict API (:func:`torch.distributed.checkpoint.state_dict.get_state_dict`
and :func:`~torch.distributed.checkpoint.state_dict.set_state_dict`), which
keys the optimizer state by parameter FQN and strips wrapper prefixes
(``_orig_mod.`` of ``torch.compile``, ``module.`` of DDP).  A checkpoint taken
from a model wrapped one way therefore restores into the same model wrapped
another way.  On torch 2.13 CPU those functions work without an initialized
process group.

What this module adds is the envelope::

    {
        "model": {fqn: tensor, ...},              # get_state_dict's model part
        "optim": {"state": {fqn: {...}}, "param_groups": [...]},
        "rng": {"torch": ByteTensor, "python": {...}, "numpy": {...}, ...},
        "extra": {...},                           # yours: step, data position, ...
    }

Every leaf is a tensor or a primitive, so the whole state loads with
``weights_only=True`` and needs no ``safe_globals``.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from typing import Any, cast

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

__all__ = ["get_rng_state", "get_state", "set_rng_state", "set_state"]

Optimizers = torch.optim.Optimizer | Iterable[torch.optim.Optimizer]


def _as_list(optimizers: Optimizers) -> list[torch.optim.Optimizer]:
    if isinstance(optimizers, torch.optim.Optimizer):
        return [optimizers]
    return list(optimizers)


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy is optional
        return None
    return numpy


def get_rng_state() -> dict[str, Any]:
    """The process's global random number generator states, as tensors and primitives.

    Covers torch's CPU generator, every CUDA device's generator when CUDA is
    initialized, Python's :mod:`random` and NumPy's legacy global generator
    (when NumPy is installed).  Generators you create yourself
    (``torch.Generator``, ``numpy.random.default_rng``) are not global: put
    their state in ``extra``.
    """
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {
            "version": version,
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss,
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # pragma: no cover - GPU
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    np = _numpy()
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        state["numpy"] = {
            "name": str(name),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore generator states taken by :func:`get_rng_state`.

    Entries that are absent are left alone (e.g. ``numpy`` when the
    checkpoint was written without NumPy installed).
    """
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    py = state.get("python")
    if py is not None:
        internal = tuple(int(x) for x in py["state"].tolist())
        random.setstate((int(py["version"]), internal, py["gauss"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():  # pragma: no cover - GPU
        torch.cuda.set_rng_state_all(cuda)
    npst = state.get("numpy")
    np = _numpy()
    if npst is not None and np is not None:
        keys = npst["keys"].numpy().astype(np.uint32)
        np.random.set_state(
            (
                npst["name"],
                keys,
                int(npst["pos"]),
                int(npst["has_gauss"]),
                float(npst["cached_gaussian"]),
            )
        )


def get_state(
    model: torch.nn.Module,
    optimizers: Optimizers,
    *,
    options: StateDictOptions | None = None,
    extra: Mapping[str, Any] | None = None,
    rng: bool = True,
) -> dict[str, Any]:
    """Collect a model's and its optimizers' state as one object to stage.

    Args:
        model: the model, plain or wrapped (``torch.compile``, DDP, ...).
        optimizers: one optimizer or a list of them (their state dicts are
            merged, keyed by parameter FQN, as ``get_state_dict`` does).
        options: passed to ``get_state_dict`` (e.g. ``full_state_dict``,
            ``cpu_offload``).
        extra: your own entries (step, data-loader position, a scheduler's
            ``state_dict()``, ...); stored under ``"extra"``.  Keep them to
            tensors and primitives so that the checkpoint loads with
            ``weights_only``.
        rng: also record the global RNG states (:func:`get_rng_state`).

    Returns:
        ``{"model": ..., "optim": ..., "rng": ..., "extra": {...}}``.  The
        tensors alias the live parameters and optimizer buffers: stage it
        (``CheckpointManager.save`` does) before training on.

    An optimizer that has not stepped yet has no state.  ``get_state_dict``
    would initialise it by running a step with zero gradients and a zero
    learning rate (so Adam's ``step`` would become 1); that state is removed
    again here, so checkpointing never changes how training continues.
    """
    opts = _as_list(optimizers)
    pristine = {id(opt) for opt in opts if not opt.state}
    model_sd, optim_sd = get_state_dict(model, opts, options=options)
    if pristine:
        # Undo get_state_dict's initialising step and drop what it recorded.
        state: dict[str, Any] = dict(cast("Mapping[str, Any]", optim_sd.get("state", {})))
        for opt, _param, fqn in _params_by_fqn(opts, optim_sd):
            if id(opt) in pristine:
                opt.state.clear()
                state.pop(fqn, None)
        optim_sd = {**optim_sd, "state": state}
    return {
        "model": model_sd,
        "optim": optim_sd,
        "rng": get_rng_state() if rng else {},
        "extra": dict(extra) if extra is not None else {},
    }


def _params_by_fqn(
    opts: list[torch.optim.Optimizer], optim_sd: Mapping[str, Any]
) -> list[tuple[torch.optim.Optimizer, torch.Tensor, str]]:
    """Pair each optimizer parameter with its FQN in an FQN-keyed optimizer state dict.

    The state dict's ``param_groups`` are the optimizers' groups, in order,
    with parameters replaced by their FQNs.
    """
    groups = list(optim_sd.get("param_groups", []))
    out: list[tuple[torch.optim.Optimizer, torch.Tensor, str]] = []
    index = 0
    for opt in opts:
        for group in opt.param_groups:
            if index >= len(groups):
                return out
            names = groups[index]["params"]
            index += 1
            out.extend((opt, p, str(n)) for p, n in zip(group["params"], names, strict=False))
    return out


def set_state(
    model: torch.nn.Module,
    optimizers: Optimizers,
    state: Mapping[str, Any],
    *,
    options: StateDictOptions | None = None,
    rng: bool = True,
) -> dict[str, Any]:
    """Load a state from :func:`get_state` into a model and its optimizers.

    The model and optimizers may be wrapped differently from the ones the
    state was taken from (plain, ``torch.compile``, DDP).  With
    ``options.strict`` (the default) a missing or unexpected model key
    raises.

    Args:
        model: the model to load into.
        optimizers: one optimizer or a list, built like those saved (same
            parameter groups).
        state: what :func:`get_state` returned (or a restored copy).
        options: passed to ``set_state_dict``.
        rng: also restore the global RNG states, when the state has them.

    Returns:
        The state's ``"extra"`` entries.
    """
    opts = _as_list(optimizers)
    optim_sd = state["optim"]
    set_state_dict(
        model, opts, model_state_dict=state["model"], optim_state_dict=optim_sd, options=options
    )
    # Parameters that had no optimizer state when saved (not stepped yet)
    # must have none now: set_state_dict may have initialised it.
    saved = optim_sd.get("state", {})
    for opt, param, fqn in _params_by_fqn(opts, optim_sd):
        if fqn not in saved:
            opt.state.pop(param, None)
    if rng and state.get("rng"):
        set_rng_state(state["rng"])
    return dict(state.get("extra", {}))
