"""Replace a module's forward for the duration of a block, then restore exactly what was there.

Every runtime patch of the pack (token-chunked feed-forward, banded resnets, the token-streamed
LinFusion layer, band parallelism, gradient checkpointing during distillation) sets an
instance-level `forward` attribute: the module stays in place, so its name, parameters and any
weight patches a host addressed to it keep working, and restoring is deleting the attribute
(or putting back the instance forward another patch had set).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn


def has_own_forward(module: nn.Module) -> bool:
    """Whether `module` carries an instance-level forward (someone's patch) over its class's."""
    return "forward" in module.__dict__


def replace_forward(module: nn.Module, forward: Callable) -> Callable[[], None]:
    """Set `forward` as the instance-level forward of `module`; returns the undo, which puts back
    the previous instance forward, or none."""
    previous = module.__dict__.get("forward")
    module.forward = forward

    def undo() -> None:
        if previous is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = previous
    return undo


def calling(wrapper: Callable, module: nn.Module) -> Callable:
    """A forward for `module` that calls wrapper(module, the forward it has now, *args, **kwargs)."""
    orig = module.forward

    def forward(*args: Any, **kwargs: Any):
        return wrapper(module, orig, *args, **kwargs)
    return forward


@contextmanager
def forwards_replaced(modules: Iterable[nn.Module], make: Callable[[nn.Module], Callable]) -> Iterator[int]:
    """Give each module the instance-level forward `make(module)` for the duration of the block
    (yields how many), then restore exactly what was there (an instance forward or none), also
    when `make` or the block raises. The modules stay in place: names, parameters and weight
    patches keep."""
    undos = []
    try:
        for m in modules:
            undos.append(replace_forward(m, make(m)))
        yield len(undos)
    finally:
        for undo in reversed(undos):
            undo()
