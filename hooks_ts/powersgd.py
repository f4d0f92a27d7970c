# PowerSGD (Vogels et al., 2019), the algorithm of PyTorch's powerSGD_hook:
#  - vanilla mean allreduce for the first `start_iter` iterations;
#  - then, per gradient viewed as an n x m matrix: compressed to rank r
#    (P = M Q, allreduce P, orthogonalize P, Q = M^T P, allreduce Q, M ~ P Q^T / N)
#    when (n + m) r * min_compression_rate < n m, else allreduced uncompressed
#    (so 1-D tensors always go uncompressed);
#  - error feedback: what compression lost is added to the next step's gradient;
#  - warm start: Q is reused (re-orthogonalized) from the previous step.
# One difference: Q's first values come from a deterministic generator seeded by
# the iteration and bucket (equal on every rank), not from numpy's RandomState.
#
# Error feedback works in place: the bucket's error tensor first becomes this
# step's input (gradient + error), P and Q are read from it, the approximation is
# written into the bucket, and the error becomes input - approximation, one
# tensor at a time (each update right before or after the pass that reads it). No
# per-step copy of the bucket and no new bucket-sized tensor: PyTorch's hook
# clones the bucket and allocates a new error every step, and large fresh host
# tensors are page-faulted in again each time (on one core, 50 MB: ~61 ms for
# that bookkeeping against ~12 ms in place; BENCHMARKS.md).
#
# State: replicated "p", "q" (per bucket) and "iter"; rank-local "error".
from typing import Dict, List
import torch
from torch import Tensor


def spec() -> Dict[str, List[str]]:
    replicated: List[str] = ["p", "q", "iter"]
    local: List[str] = ["error"]
    return {"replicated": replicated, "local": local}


def params() -> Dict[str, float]:
    return {
        "rank": 1.0,
        "start_iter": 1000.0,
        "min_compression_rate": 2.0,
        "error_feedback": 1.0,
        "warm_start": 1.0,
        "epsilon": 0.0
    }


def ranges() -> Dict[str, List[float]]:
    return {
        "rank": [1.0, 1024.0, 1.0],
        "start_iter": [0.0, 1e15, 1.0],
        "min_compression_rate": [0.0, 1e9],
        "error_feedback": [0.0, 1.0, 1.0],
        "warm_start": [0.0, 1.0, 1.0],
        "epsilon": [0.0, 1.0]
    }


def orthogonalize(matrices: Tensor, epsilon: float):
    # Gram-Schmidt for rank <= 2 (and half types), else QR, as PyTorch's hook.
    rank = matrices.shape[2]
    if rank <= 2 or matrices.dtype == torch.float16 or matrices.dtype == torch.bfloat16:
        for i in range(rank):
            col = matrices[:, :, i : i + 1]
            norm = torch.linalg_vector_norm(col, 2.0, [1], True)
            if epsilon == 0.0:
                col.div_(norm)
            else:
                col.div_(norm + epsilon)
            if i + 1 < rank:
                rest = matrices[:, :, i + 1 :]
                rest.sub_(torch.sum(col * rest, dim=[1], keepdim=True) * col)
    else:
        matrices.copy_(torch.linalg_qr(matrices)[0])


def initial_values(numel: int, seed: int, like: Tensor) -> Tensor:
    x = torch.arange(numel, dtype=torch.float64)
    u = torch.frac(torch.sin(x * 12.9898 + float(seed) * 78.233) * 43758.5453)
    return u.to(like.dtype).to(like.device)


def hook(state: Dict[str, Dict[int, Tensor]], params: Dict[str, float], group: Group, bucket: Bucket) -> Tensor:
    buffer = bucket.buffer()
    index = bucket.index()
    world = group.world_size()
    iters = state["iter"]
    if 0 not in iters:
        iters[0] = torch.zeros([1], dtype=torch.int64)
    iteration = int(iters[0].item())

    if iteration < int(params["start_iter"]):
        if bucket.is_last():
            iters[0].add_(1)
        buffer.div_(world)
        return group.allreduce(buffer)

    errors = state["error"]
    # DDP rebuilds its buckets after the first iteration; state kept for an index
    # whose bucket changed size no longer fits, so it starts over for that bucket.
    if index in errors and errors[index].numel() != buffer.numel():
        errors.pop(index)
        state["p"].pop(index)
        state["q"].pop(index)
    use_error_feedback = params["error_feedback"] != 0.0
    # `source` holds this step's input (what is compressed); the result goes into
    # `buffer`. With error feedback the source is the error tensor itself, turned
    # into gradient + error here and into input - result at the end.
    source = buffer
    add_error = False  # the error is added to the gradient one tensor at a time, below
    if use_error_feedback:
        if index in errors:
            add_error = True
        else:
            errors[index] = buffer.clone()
        source = errors[index]

    # I. Which gradients to compress: (source, result) views of each.
    offsets = bucket.offsets()
    lengths = bucket.lengths()
    sizes = bucket.sizes()
    max_rank = int(params["rank"])
    min_rate = params["min_compression_rate"]
    to_compress: List[Tensor] = []
    compress_out: List[Tensor] = []
    uncompressed: List[Tensor] = []
    uncompressed_out: List[Tensor] = []
    total_p = 0
    total_q = 0
    for i in range(len(offsets)):
        grad = source.narrow(0, offsets[i], lengths[i]).view(sizes[i])
        out = buffer.narrow(0, offsets[i], lengths[i]).view(sizes[i])
        if len(sizes[i]) == 0:
            uncompressed.append(grad)
            uncompressed_out.append(out)
            continue
        matrix = grad.view([sizes[i][0], -1])
        n = matrix.shape[0]
        m = matrix.shape[1]
        r = min(n, m, max_rank)
        if float((n + m) * r) * min_rate < float(n * m):
            to_compress.append(matrix)
            compress_out.append(out.view([n, m]))
            total_p += n * r
            total_q += m * r
        else:
            uncompressed.append(grad)
            uncompressed_out.append(out)
    if add_error:
        for k in range(len(uncompressed)):
            uncompressed[k].add_(uncompressed_out[k])

    # II. The uncompressed ones, in one contiguous buffer.
    if len(uncompressed) > 0:
        flat: List[Tensor] = []
        for t in uncompressed:
            flat.append(t.reshape([-1]))
        uncompressed_memory = torch.cat(flat)
    else:
        uncompressed_memory = torch.empty([0], dtype=buffer.dtype, device=buffer.device)

    # III. P and Q memory, kept across steps for warm start.
    p_memory = state["p"]
    q_memory = state["q"]
    warm_start = params["warm_start"] != 0.0
    need_random = (not warm_start) or (index not in p_memory)
    if need_random:
        p_memory[index] = torch.empty([total_p], dtype=buffer.dtype, device=buffer.device)
        q_memory[index] = torch.empty([total_q], dtype=buffer.dtype, device=buffer.device)

    # Matrices grouped by shape in order of first appearance, one at a time.
    shapes: List[List[int]] = []
    for mat in to_compress:
        seen = False
        for shape in shapes:
            if shape == list(mat.shape):
                seen = True
        if not seen:
            shapes.append(list(mat.shape))
    matrices: List[Tensor] = []
    outputs: List[Tensor] = []
    for shape in shapes:
        for k in range(len(to_compress)):
            if list(to_compress[k].shape) == shape:
                matrices.append(to_compress[k].unsqueeze(0))
                outputs.append(compress_out[k].unsqueeze(0))
    ps: List[Tensor] = []
    qs: List[Tensor] = []
    p_at = 0
    q_at = 0
    for mat in matrices:
        n = mat.shape[1]
        m = mat.shape[2]
        r = min(n, m, max_rank)
        ps.append(p_memory[index].narrow(0, p_at, n * r).view([1, n, r]))
        qs.append(q_memory[index].narrow(0, q_at, m * r).view([1, m, r]))
        p_at += n * r
        q_at += m * r

    epsilon = params["epsilon"]
    if not need_random:
        for q in qs:
            orthogonalize(q, epsilon)
    else:
        for k in range(len(qs)):
            q = qs[k]
            q.copy_(initial_values(q.numel(), iteration * 1000003 + index * 1009 + k, q).view(q.shape))
            orthogonalize(q, epsilon)

    # P = M Q and Q = M^T P are computed transposed (P^T = Q^T M^T, Q^T = P^T M)
    # and copied into place: a product whose rows are r wide is ~4x (P) and
    # ~14x (Q) slower in MKL on a CPU, and these two read the whole bucket
    # (BENCHMARKS.md, "PowerSGD's bookkeeping and products"). Summation order differs from
    # PyTorch's hook within float rounding (~1e-6 relative).
    # Matrix by matrix, the error is added just before the matrix is read for P,
    # and the result subtracted from it just after it is written (below): each
    # pair of passes over a matrix meets it in the cache, not twice in memory.
    for k in range(len(matrices)):
        if add_error:
            matrices[k][0].add_(outputs[k][0])
        ps[k][0].copy_(torch.mm(qs[k][0].t(), matrices[k][0].t()).t())

    group.allreduce(uncompressed_memory)
    uncompressed_memory.div_(world)
    at = 0
    for k in range(len(uncompressed_out)):
        t = uncompressed_out[k]
        t.copy_(uncompressed_memory.narrow(0, at, t.numel()).view(t.shape))
        at += t.numel()
        if use_error_feedback:
            uncompressed[k].sub_(t)

    # Ps are orthogonalized next, so they need no division by the world size.
    group.allreduce(p_memory[index])
    for p in ps:
        orthogonalize(p, epsilon)
    for k in range(len(matrices)):
        qs[k][0].copy_(torch.mm(ps[k][0].t(), matrices[k][0]).t())
    group.allreduce(q_memory[index])
    q_memory[index].div_(world)

    for k in range(len(matrices)):
        torch.bmm(ps[k], qs[k].transpose(1, 2), out=outputs[k])
        if use_error_feedback:
            matrices[k][0].sub_(outputs[k][0])
    if not warm_start:
        p_memory.clear()
        q_memory.clear()
    if bucket.is_last():
        iters[0].add_(1)
    return buffer
