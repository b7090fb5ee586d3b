# S splits of one output tile's K loop, BM x BN the tile
"""Split-K in one launch: the last of a tile's S programs adds the partial sums and runs the epilogue.

A decode GEMM has few output tiles, each looping over all of K, and on an H200 that serial loop, not the weight
bytes, set the time (``benchmarks/results/gpu-NVIDIA-H200``). Splitting K over S programs per tile multiplies the
programs, and the loads in flight, by S. Program (tile, s) reduces its K slice into a float32 ``acc``, then:

    S == 1   it runs the epilogue on ``acc`` (no partials, no counter: prefill's path, and every default today)
    S > 1    it stores ``acc`` into ``part[s]`` and bumps the tile's counter (``split_k_arrive``); the program that
             brings the counter to S adds part[0] .. part[S-1] in split order (``split_k_sum``: the same float32
             sum whichever program finishes last) and runs the epilogue, which rounds once

so the caller needs no second launch and no host-side branch on S, which is a SymInt in an engine (``layout.
split_k_plan``). ``part`` ([S, rows, cols] float32) and the counters (one int32 per output tile, zeroed) are
allocated by the caller (``ops._split_k_buffers``): flat, with strides given; unused when S == 1. The program that
completes a tile sets its counter back to 0, so a launch leaves its counters as it found them.

Counters without a fill kernel: zeroed counters given to a launch cost a memset launch of their own (a step of a
CUDA engine splits every qkv and o_proj GEMM). A chained launch (``l4::int4_mm_chained``) instead takes a zeroed
block of counter words and zeroes a fresh block for the next GEMM of the step (``zero_words``), so a whole step needs
one fill (``backends.inductor.split_k_locks_chained``).

Memory ordering (CUDA): a CTA barrier puts every thread's partial stores before the counter's atomic, whose
acq_rel semantics at gpu scope release them to the last program and acquire the others' for it; that program reads
the partials with ``.cg`` loads (L2, not a stale L1 line), software-pipelined: cp.async.cg, two splits ahead (sm_90a
PTX, Triton 3.6 and 3.7). Under the CPU interpreter programs run one after another.
"""
import triton
import triton.language as tl


@triton.jit
def split_k_arrive(lock_ptr, n_split):
    """Call once per program after its partials are stored -> True in the program that completes the tile (the
    S-th to arrive at ``lock_ptr``), which may then read every split's partials; that program also sets the counter
    back to 0."""
    tl.debug_barrier()
    last = tl.atomic_add(lock_ptr, 1, sem="acq_rel", scope="gpu") == n_split - 1
    tl.store(lock_ptr, 0, mask=last)                # every split has arrived: nothing else touches it this launch
    return last


@triton.jit
def zero_words(ptr, n_words, BLOCK: tl.constexpr):
    """Zero ``ptr[0 .. n_words)`` (int32) with every program of the launch (3-D grid) taking one share."""
    pid = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2)
    share = tl.cdiv(n_words, tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2))
    end = tl.minimum(pid * share + share, n_words)
    for w0 in range(pid * share, end, BLOCK):
        w = w0 + tl.arange(0, BLOCK)
        tl.store(ptr + w, tl.zeros((BLOCK,), tl.int32), mask=w < end)


@triton.jit
def split_k_sum(part_ptr, split_stride, offs, mask, n_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """sum over s = 0 .. S-1 of part[s * split_stride + offs] ([BM, BN] offsets, 0 where masked), float32, in
    split order. A split's load depends on s alone, so the loop is staged: at S = 8 a synchronous load per split
    would be 8 L2 round trips in a row for the tile's last program."""
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in tl.range(0, n_split, num_stages=3):
        total += tl.load(part_ptr + s * split_stride + offs, mask=mask, other=0.0, cache_modifier=".cg")
    return total


@triton.jit
def split_k_reduce(acc, part_ptr, part_offs, split_stride, mask, lock_ptr, split, n_split,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Split ``split`` of ``n_split`` for one [BM, BN] tile, its float32 sum ``acc`` -> (whether this program holds
    the tile's full sum, that sum): ``acc`` itself when S == 1; else ``acc`` goes to part[split * split_stride +
    part_offs] and the last of the tile's S programs (``lock_ptr``: the tile's counter) gets the S partials' sum,
    the others ``acc`` and False. The caller runs its epilogue where it holds the sum."""
    stored = n_split == 1
    total = acc
    if n_split > 1:
        tl.store(part_ptr + split * split_stride + part_offs, acc, mask=mask)
        stored = split_k_arrive(lock_ptr, n_split)
        if stored:
            total = split_k_sum(part_ptr, split_stride, part_offs, mask, n_split, BLOCK_M, BLOCK_N)
    return stored, total


@triton.jit
def split_k_store(acc, y_ptr, y_offs, part_ptr, part_offs, split_stride, mask, lock_ptr, split, n_split,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The plain epilogue (round to y's dtype, store) of split ``split`` of ``n_split`` for one [BM, BN] tile:
    y[y_offs] = acc when S == 1, else the sum of the S partials (part[s * split_stride + part_offs]) once all are in.
    ``lock_ptr``: the tile's counter. -> whether this program stored the tile of y (every program when S == 1)."""
    stored, total = split_k_reduce(acc, part_ptr, part_offs, split_stride, mask, lock_ptr, split, n_split,
                                   BLOCK_M, BLOCK_N)
    if stored:
        tl.store(y_ptr + y_offs, total.to(y_ptr.dtype.element_ty), mask=mask)
    return stored
