"""CUDA-event timing shared by the dev/ cupy drivers (kv_profile.py, kv_write_profile.py)."""
import cupy as cp


def timed(f, reps=20, samples=7, warmup=True):
    """Microseconds per call of `f`: `samples` runs of `reps` back-to-back calls between two
    CUDA events on the current stream, the median run (one warm-up call first unless
    `warmup` is False)."""
    if warmup:
        f()
    out = []
    for _ in range(samples):
        s, e = cp.cuda.Event(), cp.cuda.Event()
        s.record()
        for _ in range(reps):
            f()
        e.record()
        e.synchronize()
        out.append(cp.cuda.get_elapsed_time(s, e) / reps * 1e3)
    return sorted(out)[len(out) // 2]
