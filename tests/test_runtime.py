"""Where device and dtype are decided (tablefree/runtime.py): the CPU's bfloat16 choice and how it is said."""

import contextlib
import threading
from pathlib import Path

import pytest
import torch

from tablefree.errors import TableFreeError
from tablefree.runtime import in_passing_thread, native_bf16, resolve_runtime, settle_heap


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_native_bf16_is_the_cpu_feature_that_has_it():
    flags = _cpu_flags()
    expected = "amx_bf16" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else None
    assert native_bf16() == expected


def test_auto_on_the_cpu_is_float32_even_where_bfloat16_is_native():
    runtime = resolve_runtime("cpu", "auto")
    assert runtime.dtype == torch.float32
    assert runtime.describe() == f"cpu ({torch.get_num_threads()} threads), float32"


def test_an_explicit_bfloat16_says_what_runs_it():
    fp32 = resolve_runtime("cpu", "float32")
    assert fp32.dtype == torch.float32 and fp32.describe().endswith(", float32")
    assert isinstance(fp32.autocast(), contextlib.nullcontext)
    bf16 = resolve_runtime("cpu", "bfloat16")
    feature = native_bf16()
    assert bf16.describe().endswith(f"bfloat16 (native bf16: {feature})" if feature
                                    else "bfloat16 (emulated: no amx_bf16 or avx512_bf16 on this CPU)")
    with bf16.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_unknown_dtypes_name_the_choices():
    with pytest.raises(TableFreeError, match="unknown dtype 'half'; choose auto .* float32, bfloat16 or float16"):
        resolve_runtime("cpu", "half")
    with pytest.raises(TableFreeError, match="float16 is not supported on the CPU"):
        resolve_runtime("cpu", "float16")



def test_in_passing_thread_returns_and_raises_in_the_caller():
    """The work runs in another thread, which has ended by the time its result (or its exception) comes back."""
    worker = in_passing_thread(threading.current_thread)
    assert worker is not threading.current_thread() and not worker.is_alive()
    assert in_passing_thread(lambda a, b=0: a + b, 2, b=3) == 5
    with pytest.raises(TableFreeError, match="no such model"):
        in_passing_thread(_refuse, "no such model")


def _refuse(reason: str):
    raise TableFreeError(reason)


def test_settle_heap_collects_the_garbage_then_sets_the_live_objects_aside():
    """What is garbage now is collected first; what is alive leaves the collector's generations (a full collection
    no longer walks it), and objects made afterwards are tracked as usual."""
    import gc
    import weakref

    class Node:
        pass

    cycle = Node()
    cycle.me = cycle  # garbage only a collection frees
    dead = weakref.ref(cycle)
    del cycle
    keep = [Node() for _ in range(100)]
    try:
        frozen = settle_heap()
        assert dead() is None, "the garbage cycle was frozen instead of collected"
        assert frozen == gc.get_freeze_count() >= len(keep)
        walked = {id(obj) for obj in gc.get_objects()}
        assert not any(id(node) in walked for node in keep)
        later = [Node()]
        assert id(later) in {id(obj) for obj in gc.get_objects()}
    finally:
        gc.unfreeze()
