//! Every map of stoker's kernel programs, declared once. Names match the `MAP_*`
//! constants of the shared library so userspace finds them.
use agent_ebpf::{
    COUNTS_CAPACITY, EXECS_RING_BYTES, LOOPS_CAPACITY, LoopBlock, LoopThread, NET_ACCEPTING_CAPACITY,
    NET_CONN_SLOT_COUNT, NET_HEAD_BUF, NET_READY_SLOTS, NET_RING_SLOTS, NET_SK_BITS_WORDS,
    NET_SK_STATE_CAPACITY, NET_SOCKS_CAPACITY, NEW_KEYS_RING_BYTES, NetConnSlot, NetEvent, NetReady,
    NetSkState, NewKey, OFF_COUNTS_CAPACITY, OFF_PACE_SLOTS, OFF_THREADS_CAPACITY, OffKey, OffPace,
    OffThread, OffTime, PY_CODE_LINES_CAPACITY, PY_FRAME_CHUNK, PY_STACKS_CAPACITY, PY_THREADS_CAPACITY,
    PyProc, PyStack, PyWindow, STACKS_CAPACITY, SampleKey, TARGET_BITS_WORDS, TARGETS_CAPACITY, stat,
};
use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid},
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf, StackTrace},
};

use crate::programs::net::{HeadScan, NetSock};

#[map]
pub static TARGETS: HashMap<u32, u32> = HashMap::with_max_entries(TARGETS_CAPACITY, 0);

/// `TARGETS` as a bitmap (see `MAP_TARGET_BITS`).
#[map]
pub static TARGET_BITS: Array<u64> = Array::with_max_entries(TARGET_BITS_WORDS, BPF_F_MMAPABLE);

/// True when `tgid` is a target: the first test of every program.
#[inline(always)]
pub fn is_target(tgid: u32) -> bool {
    match TARGET_BITS.get_ptr(tgid >> 6) {
        // SAFETY: a word of the array (index checked by the lookup), live and aligned while the
        // program is loaded. Userspace and other CPUs change it with atomic instructions; the
        // volatile read (the kernel's `READ_ONCE`) is one aligned 8-byte load, which sees the
        // word before or after each of them. (An atomic load is what Rust would want, but the
        // BPF backend cannot select one for this CPU version.)
        Some(word) => (unsafe { core::ptr::read_volatile(word) } >> (tgid & 63)) & 1 != 0,
        None => false,
    }
}

/// Marks `tgid` as a target in the bitmap (its `TARGETS` entry is written first).
#[inline(always)]
pub fn mark_target(tgid: u32) {
    if let Some(word) = TARGET_BITS.get_ptr_mut(tgid >> 6) {
        // Atomic (BPF_ATOMIC | BPF_OR): userspace and other CPUs set and clear bits of the
        // same word. The BPF target has no `AtomicU64::fetch_or`, the intrinsic it would use.
        // SAFETY: a word of the array (index checked by the lookup), live and aligned while the
        // program is loaded; every access to it is atomic.
        unsafe {
            core::intrinsics::atomic_or::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                word,
                1 << (tgid & 63),
            )
        };
    }
}

/// See `MAP_FORKED_FROM`.
#[map]
pub static FORKED_FROM: LruHashMap<u32, u32> = LruHashMap::with_max_entries(TARGETS_CAPACITY, 0);

/// Clears `tgid`'s bit in the bitmap (its `TARGETS` entry is removed first).
#[inline(always)]
pub fn unmark_target(tgid: u32) {
    if let Some(word) = TARGET_BITS.get_ptr_mut(tgid >> 6) {
        // SAFETY: as in `mark_target` (BPF_ATOMIC | BPF_AND).
        unsafe {
            core::intrinsics::atomic_and::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                word,
                !(1 << (tgid & 63)),
            )
        };
    }
}

/// Execs for userspace (see `MAP_EXECS`).
#[map]
pub static EXEC_RING: RingBuf = RingBuf::with_byte_size(EXECS_RING_BYTES, 0);

/// 1: every exec goes to `EXEC_RING`; 0: targets' only (see `MAP_EXEC_ALL`).
#[map]
pub static EXEC_ALL: Array<u32> = Array::with_max_entries(1, 0);

#[map]
pub static STACKS: StackTrace = StackTrace::with_max_entries(STACKS_CAPACITY, 0);

#[map]
pub static COUNTS: PerCpuHashMap<SampleKey, u64> = PerCpuHashMap::with_max_entries(COUNTS_CAPACITY, 0);

#[map]
pub static PY_PROCS: HashMap<u32, PyProc> = HashMap::with_max_entries(TARGETS_CAPACITY, 0);

#[map]
pub static PY_STACKS: HashMap<u64, PyStack> = HashMap::with_max_entries(PY_STACKS_CAPACITY, 0);

#[map]
pub static PY_THREADS: HashMap<u32, u64> = HashMap::with_max_entries(PY_THREADS_CAPACITY, 0);

/// One Python stack per CPU being assembled: too large for the BPF stack.
#[map]
pub static PY_SCRATCH: PerCpuArray<PyStack> = PerCpuArray::with_max_entries(2, 0);

/// One frame prefix per CPU, read at once and parsed field by field (see `PY_FRAME_CHUNK`;
/// 8 spare bytes let a masked offset read 8 bytes without a further bounds check).
#[map]
pub static FRAME_BUF: PerCpuArray<[u8; PY_FRAME_CHUNK + 8]> = PerCpuArray::with_max_entries(2, 0);

/// The page of frames a walk of another task's memory read last, per CPU (see `PyWindow`).
#[map]
pub static PY_WINDOW_BUF: PerCpuArray<PyWindow> = PerCpuArray::with_max_entries(1, 0);

/// Tracked sockets of target processes (see `MAP_NET_CONN_SLOTS`). Mappable: stoker adds
/// the connections a process had open before the session, and frees those of a process
/// that exited, in place.
#[map]
pub static NET_CONN_SLOTS: Array<NetConnSlot> = Array::with_max_entries(NET_CONN_SLOT_COUNT, BPF_F_MMAPABLE);

/// TCP sockets of target processes from SYN sent to close: socket address -> state.
#[map]
pub static NET_SOCKS: HashMap<u64, NetSock> = HashMap::with_max_entries(NET_SOCKS_CAPACITY, 0);

/// Per-CPU event rings (see `NET_RING_SLOTS`); resized at load to the possible CPUs.
#[map]
pub static NET_EVENTS: Array<NetEvent> = Array::with_max_entries(NET_RING_SLOTS + 1, BPF_F_MMAPABLE);

/// A response's first bytes being searched for its framing, one buffer per CPU (see
/// `NET_HEAD_LEN`): too large for the BPF stack.
#[map]
pub static NET_HEAD: PerCpuArray<[u8; NET_HEAD_BUF]> = PerCpuArray::with_max_entries(1, 0);

/// Servers' sockets: queue and stall state (see `MAP_NET_SK_STATE`).
#[map]
pub static NET_SK_STATE: LruHashMap<u64, NetSkState> = LruHashMap::with_max_entries(NET_SK_STATE_CAPACITY, 0);

/// Servers' sockets: when their unread bytes arrived, a slot per socket address
/// (`ready_slot`). A socket whose slot another server's socket took keeps it in
/// `NET_SK_STATE`; a slot left by a process that died unseen is taken or cleared when a
/// socket at that address is tracked again.
#[map]
pub static NET_READY: Array<NetReady> = Array::with_max_entries(NET_READY_SLOTS, 0);

/// The `NET_READY` slot of socket `sk` (whichever socket has it).
#[inline(always)]
pub fn ready_slot(sk: u64) -> Option<&'static mut NetReady> {
    let slot = NET_READY.get_ptr_mut((sk_hash(sk) as u32) & (NET_READY_SLOTS - 1))?;
    // SAFETY: an element of the array (index checked by the lookup): live and aligned while the
    // program is loaded; plain integers. Programs on other CPUs may write it at the same time
    // (a read and `sk_data_ready`): each field is one aligned word, seen before or after.
    Some(unsafe { &mut *slot })
}

/// A filter in front of `NET_SK_STATE`, which `sk_data_ready` consults for every socket of
/// the host: one bit per hash of a `struct sock` address (`sk_bit`), set while a tracked
/// server socket has that hash. A bit shared by two sockets costs the other a lookup, or,
/// once cleared at one's close, the other's socket-queue time until its next response
/// sets it again.
#[map]
pub static NET_SK_BITS: Array<u64> = Array::with_max_entries(NET_SK_BITS_WORDS, 0);

/// A hash of socket address `sk` for `NET_SK_BITS` and `NET_READY`: `struct sock`s are
/// cache-line aligned slab objects.
#[inline(always)]
fn sk_hash(sk: u64) -> u64 {
    (sk >> 6) ^ (sk >> 26)
}

/// Word and bit of `sk` in `NET_SK_BITS`.
#[inline(always)]
pub fn sk_bit(sk: u64) -> (u32, u64) {
    let h = sk_hash(sk);
    (((h >> 6) as u32) & (NET_SK_BITS_WORDS - 1), 1 << (h & 63))
}

/// Sockets that may have a stall under way or not yet reported: `tcp_probe`, which runs for
/// every segment of the host, and the report of a request look at their state only then.
/// Indexed as `NET_SK_BITS`.
#[map]
pub static NET_SK_STALL_BITS: Array<u64> = Array::with_max_entries(NET_SK_BITS_WORDS, 0);

/// Whether a tracked server socket may have the address `sk`.
#[inline(always)]
pub fn sk_maybe_tracked(sk: u64) -> bool {
    sk_test(&NET_SK_BITS, sk)
}

/// Whether `sk` may have a stall under way or not yet reported (`NET_SK_STALL_BITS`).
#[inline(always)]
pub fn sk_maybe_stalled(sk: u64) -> bool {
    sk_test(&NET_SK_STALL_BITS, sk)
}

#[inline(always)]
fn sk_test(bits: &Array<u64>, sk: u64) -> bool {
    let (word, bit) = sk_bit(sk);
    match bits.get_ptr(word) {
        // SAFETY: a word of the array (index checked by the lookup), live and aligned while the
        // program is loaded; a racing change of the word is seen before or after.
        Some(w) => (unsafe { core::ptr::read_volatile(w) } & bit) != 0,
        None => false,
    }
}

/// Sets or clears `sk`'s bit (`NET_SK_BITS`).
#[inline(always)]
pub fn sk_mark(sk: u64, on: bool) {
    sk_set(&NET_SK_BITS, sk, on);
}

/// Sets or clears `sk`'s bit in `NET_SK_STALL_BITS`.
#[inline(always)]
pub fn sk_mark_stall(sk: u64, on: bool) {
    sk_set(&NET_SK_STALL_BITS, sk, on);
}

#[inline(always)]
fn sk_set(bits: &Array<u64>, sk: u64, on: bool) {
    let (word, bit) = sk_bit(sk);
    if let Some(w) = bits.get_ptr_mut(word) {
        // SAFETY: as in `mark_target` (BPF_ATOMIC | BPF_OR / BPF_AND): other CPUs change other
        // bits of the word.
        unsafe {
            if on {
                core::intrinsics::atomic_or::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                    w, bit,
                );
            } else {
                core::intrinsics::atomic_and::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                    w, !bit,
                );
            }
        }
    }
}

/// Connections waiting to be accepted (see `MAP_NET_ACCEPTING`).
#[map]
pub static NET_ACCEPTING: LruHashMap<u64, u64> = LruHashMap::with_max_entries(NET_ACCEPTING_CAPACITY, 0);

/// The scan of that buffer under way, one per CPU (see `HeadScan`).
#[map]
pub static NET_HEAD_SCAN: PerCpuArray<HeadScan> = PerCpuArray::with_max_entries(1, 0);

/// CPU samples of each process's GIL holder (see `MAP_GIL_HELD`).
#[map]
pub static GIL_HELD: PerCpuHashMap<u32, u64> = PerCpuHashMap::with_max_entries(TARGETS_CAPACITY, 0);

/// Off-CPU time of target threads (see `MAP_OFF_COUNTS`).
#[map]
pub static OFF_COUNTS: PerCpuHashMap<OffKey, OffTime> =
    PerCpuHashMap::with_max_entries(OFF_COUNTS_CAPACITY, 0);

/// Target threads' waits under way (see `MAP_OFF_THREADS`).
#[map]
pub static OFF_THREADS: LruHashMap<u32, OffThread> = LruHashMap::with_max_entries(OFF_THREADS_CAPACITY, 0);

/// The switch budget per window, the time since the sampler's previous run and the fast
/// threads it has met (see `MAP_OFF_BUDGET`).
#[map]
pub static OFF_BUDGET: Array<u64> = Array::with_max_entries(3, 0);

/// Target threads' pace of switches on each CPU, by the low bits of their ids (see
/// `OffPace`).
#[map]
pub static OFF_PACE: PerCpuArray<OffPace> = PerCpuArray::with_max_entries(OFF_PACE_SLOTS, 0);

/// Bound of the CPUs whose pace slots `forget_pace` looks at.
const PACE_CPUS: u32 = 1024;

/// Makes the pace slots of thread `tid` on every CPU start again at its next switch: the
/// thread called exec, so its process's GIL (kept in the slots) is the old program's. Another
/// CPU's slot is only taken back when it still holds `tid`; that CPU's own runs, were they to
/// write the slot at the same moment, keep it or restart it, both of which are right.
#[inline(always)]
pub fn forget_pace(tid: u32) {
    let index = tid & (OFF_PACE_SLOTS - 1);
    for cpu in 0..PACE_CPUS {
        // SAFETY: the map's definition (a transparent wrapper of it) and a key of the map's
        // key type; the helper checks the CPU number and returns null past the last one.
        let slot = unsafe {
            aya_ebpf::helpers::bpf_map_lookup_percpu_elem(
                core::ptr::addr_of!(OFF_PACE) as *mut core::ffi::c_void,
                core::ptr::addr_of!(index).cast(),
                cpu,
            )
        }
        .cast::<OffPace>();
        if slot.is_null() {
            break;
        }
        // SAFETY: a slot of the preallocated per-CPU array from a successful lookup: live and
        // aligned while the program is loaded; plain integers, written whole (a slot whose
        // thread id is 0, that of no target, is taken over at its next use).
        unsafe {
            if core::ptr::read_volatile(core::ptr::addr_of!((*slot).tid)) == tid {
                core::ptr::write_volatile(core::ptr::addr_of_mut!((*slot).tid), 0);
            }
        }
    }
    // Its pace starts again: it is followed until it is known (its process's bit in
    // `OFF_FAST_PROCS` is the sampler's to clear).
    set_fast(tid, tid, false);
}

/// Threads whose last switch off the CPU was followed and whose wait is not counted yet,
/// one bit per tid: the test each switch of a target thread makes before it looks up
/// `OFF_THREADS`. Set and cleared there and at the thread's CPU samples, and set by
/// userspace for a wait under way when a session starts (see `MAP_OFF_PENDING`).
#[map]
pub static OFF_PENDING: Array<u64> = Array::with_max_entries(TARGET_BITS_WORDS, BPF_F_MMAPABLE);

/// True when `tid`'s bit in `OFF_PENDING` is set.
#[inline(always)]
pub fn is_pending(tid: u32) -> bool {
    tid_bit(&OFF_PENDING, tid)
}

/// Sets or clears `tid`'s bit in `OFF_PENDING`.
#[inline(always)]
pub fn set_pending(tid: u32, on: bool) {
    set_tid_bit(&OFF_PENDING, tid, on);
}

/// `co_firstlineno` of the code objects that walks of another process's memory met, by
/// code address and process: a lookup costs a small part of such a read. The value holds
/// the line in its low half and, in its high half, the clock's second (`code_line_epoch`)
/// at which it was read; an entry of an earlier second is read again, so a code object
/// freed and another made at its address is told apart within about a second.
#[map]
pub static PY_CODE_LINES: LruHashMap<[u64; 2], u64> = LruHashMap::with_max_entries(PY_CODE_LINES_CAPACITY, 0);

/// The wall-clock sampler's threads (see `SampledThread`).
#[map]
pub static OFF_SAMPLED: LruHashMap<u32, agent_ebpf::SampledThread> =
    LruHashMap::with_max_entries(agent_ebpf::OFF_THREADS_CAPACITY, 0);

/// Threads of target processes that switched off the CPU faster than the switch budget at
/// their last switch, one bit per tid: their switches are not followed, and the wall-clock
/// sampler (`off_cpu_sample`) counts their time off the CPU instead.
#[map]
pub static OFF_FAST: Array<u64> = Array::with_max_entries(TARGET_BITS_WORDS, 0);

/// True when `tid`'s bit in `OFF_FAST` is set.
#[inline(always)]
pub fn is_fast(tid: u32) -> bool {
    tid_bit(&OFF_FAST, tid)
}

/// Sets or clears `tid`'s bit in `OFF_FAST` (written only when it changes); as it turns
/// fast, sets its process's bit in `OFF_FAST_PROCS`.
#[inline(always)]
pub fn set_fast(tgid: u32, tid: u32, on: bool) {
    if is_fast(tid) != on {
        set_tid_bit(&OFF_FAST, tid, on);
        if on {
            set_tid_bit(&OFF_FAST_PROCS, tgid, true);
        }
    }
}

/// See `MAP_OFF_FAST_PROCS`.
#[map]
pub static OFF_FAST_PROCS: Array<u64> = Array::with_max_entries(TARGET_BITS_WORDS, BPF_F_MMAPABLE);

/// `tid`'s bit in a bitmap of thread ids.
#[inline(always)]
fn tid_bit(bits: &Array<u64>, tid: u32) -> bool {
    match bits.get_ptr(tid >> 6) {
        // SAFETY: as in `is_target`.
        Some(word) => (unsafe { core::ptr::read_volatile(word) } >> (tid & 63)) & 1 != 0,
        None => false,
    }
}

/// Sets or clears `tid`'s bit in a bitmap of thread ids.
#[inline(always)]
fn set_tid_bit(bits: &Array<u64>, tid: u32, on: bool) {
    if let Some(word) = bits.get_ptr_mut(tid >> 6) {
        // SAFETY: as in `mark_target` and `unmark_target`: atomic OR and AND on a word of the
        // array; other CPUs set and clear other bits of it.
        unsafe {
            if on {
                core::intrinsics::atomic_or::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                    word,
                    1 << (tid & 63),
                );
            } else {
                core::intrinsics::atomic_and::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                    word,
                    !(1 << (tid & 63)),
                );
            }
        }
    }
}

/// Event-loop threads of target processes (see `MAP_LOOPS`).
#[map]
pub static LOOPS: LruHashMap<u32, LoopThread> = LruHashMap::with_max_entries(LOOPS_CAPACITY, 0);

/// The blocked-loop threshold in nanoseconds, set by userspace (0: off).
#[map]
pub static LOOP_THRESHOLD: Array<u64> = Array::with_max_entries(1, 0);

/// Blocked event-loop stretches for userspace (see `MAP_LOOP_BLOCKS`): 1,638 at 40 bytes.
#[map]
pub static LOOP_BLOCKS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

const _: () = assert!(core::mem::size_of::<LoopBlock>() <= 64);

/// New keys for userspace to name (see `MAP_NEW_KEYS`).
#[map]
pub static NEW_KEY_RING: RingBuf = RingBuf::with_byte_size(NEW_KEYS_RING_BYTES, 0);

/// Tells userspace about a key just added to a counts map, with its thread's name when
/// the program runs in that thread. Userspace is woken when it had read everything before
/// (it names new stacks soon, while their code objects live; see `Tracker::wait`).
#[inline(always)]
pub fn new_key(key: &SampleKey) {
    bump(stat::NEW_KEYS);
    let mut item = NewKey { key: *key, comm: [0; 16] };
    if bpf_get_current_pid_tgid() as u32 == key.tid
        && let Ok(comm) = bpf_get_current_comm()
    {
        item.comm = comm;
    }
    if NEW_KEY_RING.output::<NewKey>(&item, 0).is_err() {
        bump(stat::NEW_KEYS_UNSENT);
    }
}

#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// Adds `n` to a per-CPU counter.
#[inline(always)]
pub fn add(index: u32, n: u64) {
    if let Some(p) = STATS.get_ptr_mut(index) {
        // SAFETY: this CPU's counter in a per-CPU array: live and aligned while the program is
        // loaded, and only this run touches it (tracing programs never nest on one CPU: the
        // kernel skips one that would).
        unsafe { *p += n };
    }
}

/// Adds one to a per-CPU counter; returns the counter's previous value.
#[inline(always)]
pub fn bump(index: u32) -> u64 {
    match STATS.get_ptr_mut(index) {
        // SAFETY: as in `add`.
        Some(p) => unsafe {
            let old = *p;
            *p = old + 1;
            old
        },
        None => 0,
    }
}
