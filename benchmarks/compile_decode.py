"""Does `torch.compile` pay for the decode step on this CPU? The experiment behind the README's answer:

  python -m benchmarks.compile_decode

Compiles one decode step of the engine's own forward (inductor with freezing, which packs the linear
weights itself, and dynamic shapes, since batch size and cache width change every step), then times it
as the cache width grows, against the eager step with packed weights. Takes minutes on two cores.
"""

from __future__ import annotations

import statistics
import time

import torch

from app.model.forward import DecoderForward
from app.model.loader import load_model
from app.settings import Settings


def decode_step(forward: DecoderForward, ids, lengths, k_cache, v_cache, width: int):
    n = ids.shape[0]
    positions = torch.arange(width, device=ids.device)
    mask = forward.group_mask((positions.unsqueeze(0) <= lengths.unsqueeze(1)).unsqueeze(1), k_cache.dtype)
    rows = torch.arange(n)

    def attend(i, q, k, v):
        k_cache[i, rows, :, lengths] = k[:, :, 0]
        v_cache[i, rows, :, lengths] = v[:, :, 0]
        return forward.grouped_attention(q, k_cache[i, :n, :, :width], v_cache[i, :n, :, :width], mask)

    hidden = forward.hidden(forward.embed(ids), lengths.unsqueeze(1), attend)
    return forward.logits(hidden[:, -1])


def main() -> int:
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    loaded = load_model(Settings())
    plain, packed = DecoderForward(loaded.model), DecoderForward(loaded.model, pack_weights=True)
    shape = (len(plain.layers), 64, plain.num_kv_heads, 1024, plain.head_dim)
    for batch in (1, 16):
        k_cache, v_cache = torch.zeros(shape, dtype=loaded.dtype), torch.zeros(shape, dtype=loaded.dtype)
        lengths, ids = torch.full((batch,), 150), torch.randint(0, 1000, (batch, 1))
        with torch.inference_mode():
            eager = []
            for _ in range(12):
                t = time.perf_counter()
                decode_step(packed, ids, lengths, k_cache, v_cache, 151)
                eager.append(time.perf_counter() - t)
            compiled = torch.compile(lambda *a: decode_step(plain, *a), dynamic=True)
            t = time.perf_counter()
            compiled(ids, lengths, k_cache, v_cache, 151)
            first = time.perf_counter() - t
            steps = []
            for k in range(6):  # the cache grows by one position a step, as in serving
                t = time.perf_counter()
                compiled(ids, lengths, k_cache, v_cache, 152 + k)
                steps.append(time.perf_counter() - t)
        print(f"batch {batch}: eager packed step {1000 * statistics.median(eager[2:]):.1f} ms; compiled: first call "
              f"{first:.0f} s, then {1000 * statistics.median(steps):.0f} ms a step as the width grows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
