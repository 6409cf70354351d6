"""The backend registry: one way to pick how every op runs, chosen once before the weights are loaded.

An op (linear, int8 linear, MLA decode, MoE experts, RMSNorm) is an abstract interface with a torch oracle that
runs everywhere. A backend is one class that declares what it supports (devices, dtypes, quantization, the CPU
extension, plus an optional extra `requirement`); it never inherits from the oracle. `select` walks the op's
backends in preference order ("auto") or takes the one named, and runs the same self-check for every op: the
op's small ragged case on the candidate against the oracle in float32 on the same rounded inputs.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import ClassVar, Generic, TypeVar

import torch

from model.ops import cpu_extension

logger = logging.getLogger(__name__)

FLOAT_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})


@dataclasses.dataclass(frozen=True)
class Target:
    """What the model runs as: device, activation dtype and weight quantization ("none" or "int8")."""

    device: torch.device
    dtype: torch.dtype
    quantization: str = "none"

    def __str__(self) -> str:
        quant = "" if self.quantization == "none" else f", {self.quantization} weights"
        return f"{self.device.type} {str(self.dtype).removeprefix('torch.')}{quant}"


class Backend:
    """One way to run an op. Subclasses set the class attributes and may add a `requirement`."""

    name: ClassVar[str]
    devices: ClassVar[frozenset[str]] = frozenset({"cpu", "cuda"})
    dtypes: ClassVar[frozenset[torch.dtype]] = FLOAT_DTYPES
    quantizations: ClassVar[frozenset[str]] = frozenset({"none", "int8"})  # weight forms it can read
    needs_extension: ClassVar[bool] = False  # the C++ CPU extension (model/csrc) must load

    @classmethod
    def unsupported(cls, target: Target) -> str | None:
        """Why this backend cannot run on `target`, or None."""
        if target.device.type not in cls.devices:
            return f"runs on {'/'.join(sorted(cls.devices))} only"
        if target.dtype not in cls.dtypes:
            return f"supports {'/'.join(sorted(str(d).removeprefix('torch.') for d in cls.dtypes))} only"
        if target.quantization not in cls.quantizations:
            return f"does not read {target.quantization} weights"
        if cls.needs_extension and not cpu_extension.load():
            return "the CPU extension did not load (see the log above)"
        return cls.requirement(target)

    @classmethod
    def requirement(cls, target: Target) -> str | None:
        """A backend's own condition beyond the declared ones (a torch op, a GPU generation), or None."""
        return None

    @classmethod
    def auto_skip(cls, target: Target) -> str | None:
        """Why "auto" passes this backend over although it could run (another one serves better), or None."""
        return None


B = TypeVar("B", bound=Backend)
# The op's self-check case: (backend, make) -> output. `make(*shape, scale=1.0)` draws the same random values
# on every call sequence, rounded to the target dtype and then held in the dtype the run uses.
MakeTensor = Callable[..., torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Op(Generic[B]):
    """An op: its backends in "auto" preference order (the oracle last), its self-check case and tolerances."""

    name: str  # as the log table and errors print it, e.g. "MoE experts"
    flag: str | None  # the CLI flag that names its backend, e.g. "--moe-backend"
    backends: tuple[type[B], ...]
    case: Callable[[B, MakeTensor], torch.Tensor]
    tolerance: dict[torch.dtype, tuple[float, float]]  # dtype -> (atol, rtol) of the self-check

    @property
    def oracle(self) -> type[B]:
        return self.backends[-1]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.backends)


@dataclasses.dataclass(frozen=True)
class Choice(Generic[B]):
    """The backend chosen for an op and why (a row of the start-up table)."""

    op: str
    backend: B
    reason: str


class BackendError(ValueError):
    """A backend asked for by name that cannot run here; the message names the op, the backend and why."""


def self_check(op: Op[B], backend: B, target: Target) -> str | None:
    """Run the op's case on `backend` in the target dtype and on the oracle in float32; None when they agree."""
    if isinstance(backend, op.oracle):
        return None

    def maker(run_dtype: torch.dtype) -> MakeTensor:
        g = torch.Generator().manual_seed(0)

        def make(*shape: int, scale: float = 1.0) -> torch.Tensor:
            values = (torch.randn(shape, generator=g) * scale).to(target.dtype)
            return values.to(target.device, run_dtype)
        return make

    try:
        with torch.no_grad():
            got = op.case(backend, maker(target.dtype)).float().cpu()
            want = op.case(op.oracle(), maker(torch.float32)).float().cpu()
    except Exception as exc:  # a missing op, an unsupported GPU, a compiler that fails: all mean "not here"
        return f"its self-check raised {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    atol, rtol = op.tolerance[target.dtype]
    if not torch.allclose(got, want, atol=atol, rtol=rtol):
        return f"failed its self-check (max difference {float((got - want).abs().max()):.3g} from the oracle)"
    return None


def _try(op: Op[B], cls: type[B], target: Target) -> tuple[B | None, str | None]:
    """(the backend, None) when `cls` runs on `target` and passes the self-check, else (None, why)."""
    why = cls.unsupported(target)
    if why is not None:
        return None, why
    try:
        backend = cls()
    except Exception as exc:  # e.g. an optional package that imports but is broken
        return None, f"{type(exc).__name__}: {exc}"
    why = self_check(op, backend, target)
    return (backend, None) if why is None else (None, why)


def select(op: Op[B], target: Target, name: str = "auto") -> Choice[B]:
    """The backend for `op` on `target`: the one named, or the first of op.backends that runs and checks out."""
    if name != "auto":
        named = [b for b in op.backends if b.name == name]
        if not named:
            raise BackendError(f"{op.flag or op.name}: unknown {op.name} backend {name!r}, expected one of "
                               f"auto, {', '.join(op.names)}")
        backend, why = _try(op, named[0], target)
        if backend is None:
            raise BackendError(f"{op.flag or op.name} {name}: the {op.name} backend {name} cannot run on "
                               f"{target}: {why}")
        return Choice(op.name, backend, "asked for by name")
    passed: list[str] = []
    for cls in op.backends:
        why = cls.unsupported(target) or cls.auto_skip(target)
        if why is None:
            backend, why = _try(op, cls, target)
            if backend is not None:
                return Choice(op.name, backend, "auto" + (f"; not {', '.join(passed)}" if passed else ""))
            logger.warning("%s backend %s on %s: %s", op.name, cls.name, target, why)
        passed.append(f"{cls.name}: {why}")
    raise AssertionError(f"{op.name}: the oracle {op.oracle.name} refused {target}: {passed[-1]}")
