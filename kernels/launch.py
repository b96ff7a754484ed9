"""Launch a Triton kernel for less host time: ``fast_launch(kernel)[grid](*args, **constexprs)``.

A training step calls the layers' kernels on every layer, and at the shapes users train with the step is
host-bound (reports/h200/bench: the GPU waits for the host's launches). Triton's own launch
(``JITFunction.run``) binds and specialises every argument, builds and hashes a cache key from strings, and asks
the driver for the device and stream — tens of µs a launch on a datacentre host, more than the kernel itself at
small shapes. :class:`FastLaunch` looks the compiled kernel up by a key of Python values instead, and calls the
compiled kernel's launcher directly, as ``JITFunction.run`` does once it has found it.

Contract: the kernel launched and its arguments are the ones Triton's own launch would use, so the results are the
same bits. The key is at least as fine as Triton's specialisation: the current device; per tensor its dtype and
whether its address is a multiple of 16; per int whether it is 1, whether it is a multiple of 16 and its integer
width (i32, i64, u64); per bool and None its value; floats by type only (Triton does not specialise them); the
keywords (constexprs and launch options) by type and value. Through Triton's own launch go: a call whose key is
new; an argument of another type (a TMA descriptor, a tuple); a constexpr passed positionally; a set launch hook
(``triton.knobs.runtime.launch_enter_hook`` or ``launch_exit_hook``: profilers), pipeline-inspection hook or
``pre_run_hooks`` entry; the Triton interpreter; a ROCm build; ``DORA_VERIFY_FAST_LAUNCH=0``. What it skips: Triton's
check that global variables a kernel reads have not changed since it compiled (these kernels read constexpr
globals only), and re-reading ``triton.knobs`` (debug, instrumentation) on every launch: set those before the
first launch.
"""

from __future__ import annotations

import inspect

import torch

from .dispatch import HAS_TRITON, getenv, interpreting

try:  # the knobs hold the launch hooks (Triton >= 3.4); without them the fast path stays off
    from triton import knobs as _knobs

    _RUNTIME = _knobs.runtime
except Exception:  # pragma: no cover - depends on the Triton version
    _RUNTIME = None

_CUDA_BUILD = torch.version.hip is None
broken: "str | None" = None  # why the fast path turned itself off for good (a launcher it could not call), if it did
_UNCACHED = object()  # an argument the key cannot describe: Triton's own launch
_I32, _I64 = 2**31, 2**63


def _arg_key(a):
    """What Triton may specialise ``a`` on (module docstring), as a hashable value; _UNCACHED if not describable."""
    t = type(a)
    if t is bool:  # tagged by type: False == 0 == 0.0 as dictionary keys
        return ("u1", a)
    if t is int:
        return ("int", a == 1, a % 16 == 0, 0 if -_I32 <= a < _I32 else (1 if -_I64 <= a < _I64 else 2))
    if t is float:
        return "fp32"
    if a is None:
        return None
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    return _UNCACHED


def _hooked() -> bool:
    """Whether a launch hook is set (a profiler's: Triton's own launch then builds the metadata hooks read; Triton
    3.4–3.6 keep a hook or None, later versions a chain of hooks, empty when none is set) or a pipeline-inspection
    hook (which adds to Triton's cache key)."""
    if getattr(_RUNTIME, "add_stages_inspection_hook", None) is not None:
        return True
    return any(
        h is not None and (not hasattr(h, "calls") or bool(h.calls))
        for h in (_RUNTIME.launch_enter_hook, _RUNTIME.launch_exit_hook)
    )


def fast_launch_enabled() -> bool:
    """Whether :class:`FastLaunch` may skip Triton's own launch (``DORA_VERIFY_FAST_LAUNCH``, default on; NVIDIA
    builds only: AMD's backend specialises tensors on more than the key holds)."""
    return (
        HAS_TRITON
        and _RUNTIME is not None
        and broken is None
        and _CUDA_BUILD
        and getenv("DORA_VERIFY_FAST_LAUNCH", "1") != "0"
    )


class FastLaunch:
    """A ``@triton.jit`` kernel whose ``[grid](...)`` launch reuses the compiled kernel of an earlier launch with
    the same key (module docstring). ``.fn`` is the kernel; ``.fast_launches`` counts the launches that skipped
    Triton's own."""

    def __init__(self, fn):
        self.fn = fn
        params = inspect.signature(fn.fn).parameters
        self._names = tuple(params)
        self._defaults = {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}
        constexpr = [i for i, p in enumerate(params.values()) if "constexpr" in str(p.annotation)]
        self._positional_max = constexpr[0] if constexpr else len(self._names)  # constexprs must come as keywords
        self._cache = {}
        self.fast_launches = 0

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    @staticmethod
    def key(device: int, args: tuple, kwargs: dict):
        """The cache key of a launch (module docstring); its second part holds _UNCACHED for an argument it cannot
        describe."""
        return (device, tuple(map(_arg_key, args)), tuple((k, type(v), v) for k, v in kwargs.items()))

    def _tail(self, n_args: int, kwargs: dict):
        """The values of the parameters after the positional ones, in signature order (as Triton binds them)."""
        return tuple(kwargs[n] if n in kwargs else self._defaults[n] for n in self._names[n_args:])

    def launch(self, grid, args: tuple, kwargs: dict):
        """Launch on ``grid`` (a tuple of up to three ints) with ``args`` and the keywords ``kwargs``: the runtime
        arguments positionally, the constexprs and launch options as keywords (a constexpr passed positionally
        would be keyed by its type, not its value: such a call takes Triton's own launch)."""
        if (
            not fast_launch_enabled()
            or interpreting()
            or _hooked()
            or len(args) > self._positional_max
            or getattr(self.fn, "pre_run_hooks", None)
        ):
            return self.fn[grid](*args, **kwargs)
        device = torch.cuda.current_device()
        key = self.key(device, args, kwargs)
        if _UNCACHED in key[1]:
            return self.fn[grid](*args, **kwargs)
        hit = self._cache.get(key)
        if hit is None:
            kernel = self.fn[grid](*args, **kwargs)  # Triton's own launch (compiling on first use)
            run = getattr(kernel, "run", None)  # the compiled kernel's launcher (loading its binary where not yet)
            if run is None:  # not a compiled kernel (an interpreted launch)
                return kernel
            self._cache[key] = (run, kernel.function, kernel.packed_metadata, self._tail(len(args), kwargs))
            return kernel
        run, function, packed, tail = hit
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        stream = torch._C._cuda_getCurrentRawStream(device)
        try:
            run(grid[0], g1, g2, stream, function, packed, None, None, None, *args, *tail)
        except TypeError as e:  # a launcher whose calling convention is not this one (argument parsing: nothing ran)
            global broken
            broken = f"{type(e).__name__}: {e}"[:300]
            self._cache.clear()
            return self.fn[grid](*args, **kwargs)
        self.fast_launches += 1
        return None


def fast_launch(fn) -> FastLaunch:
    """Wrap a ``@triton.jit`` kernel so that its launches take :class:`FastLaunch`'s path."""
    return FastLaunch(fn)


__all__ = ["FastLaunch", "fast_launch", "fast_launch_enabled"]
