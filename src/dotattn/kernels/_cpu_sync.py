"""The spinning partner threads' handshake, in machine code (``_launch.Partners``).

A parallel kernel call hands its work to partner threads that spin between calls, instead of
waking pool threads through the OS: on these virtual machines a thread woken through a futex
(a ``ThreadPoolExecutor`` task, the caller's ``future.result()``) starts 20–90 µs late, twice
a call, and the caller's ``submit`` alone took ≈ 23 µs on the Intel Xeon of 5 Dec 2026
(docs/performance-log.md, "Small calls' threads: spinning partners").  The partners, the
decode kernel's since 2 Dec, serve every kernel that has a caller's and a partner's entry
(``_cpu_decode_kernels.run_items_caller``/``run_items_partner``,
``_cpu_small_kernels.forward_caller``/``forward_partner``,
``_cpu_model_ops.chunks_caller``/``chunks_partner``): the entries store and read the
flags below with these atomics (and the decode items take their tickets with `_fetch_add`), so
no lock and no system call is on the path of a call.
"""

from __future__ import annotations

import platform

from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from ._cpu_cache import install_locator

install_locator()  # before any @njit(cache=True) below: the kernels cache beside the package

_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def _slot(context, builder, signature, args):
    """The address of ``args[0][args[1]]`` (an int64 array's element) in an intrinsic's IR."""
    ary = context.make_array(signature.args[0])(context, builder, args[0])
    i = context.cast(builder, args[1], signature.args[1], types.int64)
    return builder.gep(ary.data, [i])


def _int64s(ary) -> bool:
    return isinstance(ary, types.Array) and ary.dtype == types.int64


@intrinsic
def _fetch_add(typingctx, counter, value):
    """``counter[0] += value`` atomically; returns the value before (``atomicrmw add``)."""
    if not _int64s(counter):
        return None
    sig = types.int64(counter, value)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        v = context.cast(builder, args[1], signature.args[1], types.int64)
        return builder.atomic_rmw("add", ary.data, v, "monotonic")

    return sig, codegen


@intrinsic
def _fetch_add_acq_rel(typingctx, counter, index, value):
    """``counter[index] += value`` atomically with acquire-release order; returns the value
    before: the thread that brings a count to its end sees every write the other threads made
    before their adds."""
    if not _int64s(counter):
        return None
    sig = types.int64(counter, index, value)

    def codegen(context, builder, signature, args):
        v = context.cast(builder, args[2], signature.args[2], types.int64)
        return builder.atomic_rmw("add", _slot(context, builder, signature, args), v, "acq_rel")

    return sig, codegen


@intrinsic
def _cas(typingctx, flags, index, expected, value):
    """``flags[index] = value`` if it holds ``expected``, atomically (acquire-release); True when
    it did (``cmpxchg``)."""
    if not _int64s(flags):
        return None
    sig = types.boolean(flags, index, expected, value)

    def codegen(context, builder, signature, args):
        e, v = (context.cast(builder, args[k], signature.args[k], types.int64) for k in (2, 3))
        pair = builder.cmpxchg(_slot(context, builder, signature, args), e, v, "acq_rel", "acquire")
        return builder.extract_value(pair, 1)

    return sig, codegen


@intrinsic
def _load_acquire(typingctx, flags, index):
    """``flags[index]`` read atomically (acquire): a spin loop's load that LLVM may not hoist, and
    after which the writes the other thread made before its release store are visible."""
    if not _int64s(flags):
        return None
    sig = types.int64(flags, index)

    def codegen(context, builder, signature, args):
        return builder.load_atomic(_slot(context, builder, signature, args), "acquire", 8)

    return sig, codegen


@intrinsic
def _store_release(typingctx, flags, index, value):
    """``flags[index] = value`` atomically (release): the thread's earlier writes (its parts)
    are visible to a thread that reads the value with :func:`_load_acquire`."""
    if not _int64s(flags):
        return None
    sig = types.void(flags, index, value)

    def codegen(context, builder, signature, args):
        v = context.cast(builder, args[2], signature.args[2], types.int64)
        builder.store_atomic(v, _slot(context, builder, signature, args), "release", 8)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _cycles(typingctx):
    """The CPU's time-stamp counter (``llvm.readcyclecounter``: ``rdtsc`` on x86), for spin
    limits; :func:`dotattn.kernels._launch.tsc_rate` measures its rate once."""
    sig = types.int64()

    def codegen(context, builder, signature, args):
        fn = builder.module.declare_intrinsic("llvm.readcyclecounter", fnty=ir.FunctionType(ir.IntType(64), []))
        return builder.call(fn, [])

    return sig, codegen


@intrinsic
def _spin_pause(typingctx):
    """A spin loop's breather (``pause`` on x86): it spares the memory pipeline and the other
    hyperthread; elsewhere nothing."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        if _X86:
            fn = builder.module.declare_intrinsic("llvm.x86.sse2.pause", fnty=ir.FunctionType(ir.VoidType(), []))
            builder.call(fn, [])
        return context.get_dummy_value()

    return sig, codegen


# A call on the spinning partner threads (``_launch.Partners``) signals through one int64
# array: the call's number g at [POSTED] (stored by the caller in Python, under the GIL, before
# it looks for parked partners to wake: a partner deciding to park under the GIL sees one or
# the other) and at [ENTERED] (stored by the caller's kernel as it starts: the GIL is free from
# then on, so a partner that takes it to read the call does not sleep on it); partner i's
# slots, on their own cache line at FLAG_STRIDE·(i + 1): CLAIM (2g when the partner took call
# g, 2g + 1 when the caller, its items done, found it had not and cancelled its part: a
# compare-and-swap decides between the two) and DONE (g once the partner's parts are written).
# A partner that wakes late (a parked thread on this VM woke 0.1 to several ms after its
# futex) is thus never waited for: the caller has run every item itself.  IDLE (g once the
# partner is back in partner_wait, the GIL released after call g): a caller that returned to
# Python as soon as DONE came found the partner still holding the GIL (its few µs of Python
# between calls) and slept on it — woken 20–40 µs later on the Intel Xeon of 5 Dec 2026 — so
# the caller spins for IDLE too, within the same spin budget.
POSTED, ENTERED = 0, 1
FLAG_STRIDE, CLAIM, DONE, IDLE = 8, 0, 1, 2


@njit(cache=True, nogil=True)
def tsc():
    """The time-stamp counter (for ``_launch`` to measure its rate once)."""
    return _cycles()


@njit(cache=True, inline="always")
def _settle(flags, slot, gen, value):
    """CLAIM slot ``slot``: set it to ``value`` (2·gen or 2·gen + 1) unless call ``gen`` is settled
    already; returns the slot's value for call ``gen`` afterwards."""
    while True:
        v = _load_acquire(flags, slot)
        if v >= 2 * gen:
            return v
        if _cas(flags, slot, v, value):
            return value


@njit(cache=True, nogil=True)
def partner_wait(flags, i, seen, max_cycles):
    """Partner ``i`` between calls: spin until a call after ``seen`` has ENTERED, then claim it;
    returns its number g when claimed, −g when its caller had cancelled this partner's part
    (the partner waits for the next one), ``seen`` when ``max_cycles`` of the time-stamp counter
    passed with no call.  Stores ``seen`` in the partner's IDLE slot first (the GIL is free)."""
    _store_release(flags, FLAG_STRIDE * (i + 1) + IDLE, seen)
    t0 = _cycles()
    while True:
        g = _load_acquire(flags, ENTERED)
        if g != seen:
            if _settle(flags, FLAG_STRIDE * (i + 1) + CLAIM, g, 2 * g) == 2 * g:
                return g
            return -g
        if _cycles() - t0 > max_cycles:
            return seen
        _spin_pause()


@njit(cache=True, inline="always")
def finish_partners(flags, gen, partners, max_cycles):
    """The caller's side of call ``gen`` once its own work is done: for each partner, cancel its
    part if it has not claimed the call (it may be waking still; the caller runs that part, or
    a shared queue of items is empty by now), else spin until its DONE slot holds ``gen`` — its
    parts written — and then its IDLE slot (out of Python again: returning to Python while the
    partner holds the GIL, the caller would sleep on it), or until ``max_cycles`` of the
    time-stamp counter pass.  Returns ``(cancelled, left)``: bit i of ``cancelled`` set for a
    partner cancelled here, ``left`` the partners whose parts were not written when the spin
    ran out (the caller then waits in Python: a partner off its core)."""
    t0 = _cycles()
    cancelled = 0
    left = 0
    for i in range(partners):
        base = FLAG_STRIDE * (i + 1)
        if _settle(flags, base + CLAIM, gen, 2 * gen + 1) == 2 * gen + 1:
            cancelled |= 1 << i
            continue
        while _load_acquire(flags, base + DONE) != gen:
            if _cycles() - t0 > max_cycles:
                left += 1
                break
            _spin_pause()
        while _load_acquire(flags, base + IDLE) < gen and _cycles() - t0 <= max_cycles:
            _spin_pause()
    return cancelled, left


@njit(cache=True, inline="always")
def partner_done(flags, i, gen):
    """Partner ``i``'s parts of call ``gen`` are written: ``gen`` into its DONE slot (release)."""
    _store_release(flags, FLAG_STRIDE * (i + 1) + DONE, gen)
