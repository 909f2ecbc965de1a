import torch

from app.engine.prefix_cache import PrefixCache
from app.model.forward import DecoderForward
from tests.helpers import random_deep_prompt_set, save_ref


def test_lru_bounded_by_count_and_bytes_with_memory_close_to_tensor_size(tiny, tmp_path):
    refs = [save_ref(tmp_path, f"t{i}", random_deep_prompt_set(tiny.spec, 4, seed=i), tiny.spec) for i in range(6)]
    one = PrefixCache(DecoderForward(tiny.model), tiny.spec, torch.device("cpu"), torch.float32, 100)
    size = one.get(refs[0]).nbytes()
    assert one.resident_bytes() == size == 2 * tiny.spec.num_layers * tiny.spec.num_kv_heads * 4 * \
        tiny.spec.head_dim * 4  # exactly the tensors: nothing else is kept per prompt set
    by_count = PrefixCache(DecoderForward(tiny.model), tiny.spec, torch.device("cpu"), torch.float32, 3)
    by_bytes = PrefixCache(DecoderForward(tiny.model), tiny.spec, torch.device("cpu"), torch.float32, 100,
                           max_bytes=2 * size)
    for cache, keep in ((by_count, 3), (by_bytes, 2)):
        for ref in refs:
            cache.get(ref)
        assert len(cache) == keep and cache.resident_bytes() == keep * size and cache.misses == 6
        cache.get(refs[-1])
        assert cache.hits == 1  # the most recent stays resident
        cache.get(refs[0])
        assert cache.misses == 7  # the oldest was evicted
