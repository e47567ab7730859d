"""Prefix-cache arithmetic: the block pool and KV cache manager directly, then through a whole
simulation (cross-turn reuse, shared prefixes, hash_ids traces)."""

from __future__ import annotations

import pytest

from simkit import call, make_deployment, make_req, program, rows_by_call, run_sim
from simulator.engine.block_pool import BlockPool
from simulator.engine.kv_cache_manager import KVCacheManager
from simulator.engine.request import Request

BS = 4


def _computed(kv: KVCacheManager, req, n_tokens=None):
    """Allocate and 'compute' a request's prompt (all of it, or n_tokens) in one go."""
    n = req.num_tokens if n_tokens is None else n_tokens
    assert kv.allocate_slots(req, n)
    req.num_computed_tokens = n
    return kv.req_to_blocks[req.request_id]


def test_hits_are_full_blocks_only():
    """A 10-token prompt leaves 2 full blocks cached; the same content hits 8 tokens."""
    kv = KVCacheManager(64, BS)
    _computed(kv, make_req(0, 10, keys=[1, 2, 3]))
    blocks, n = kv.get_computed_blocks(make_req(1, 11, keys=[1, 2, 3]))
    assert n == 8 and len(blocks) == 2


def test_hit_never_covers_the_last_prompt_token():
    """A prompt that is exactly 3 full blocks hits at most 2 blocks, even if all 3 are cached."""
    kv = KVCacheManager(64, BS)
    _computed(kv, make_req(0, 12, keys=[1, 2, 3]))
    _, n = kv.get_computed_blocks(make_req(1, 12, keys=[1, 2, 3]))
    assert n == 8


def test_hit_of_a_one_block_prompt_is_zero():
    """A prompt of one full block never hits (its last token must be computed)."""
    kv = KVCacheManager(64, BS)
    _computed(kv, make_req(0, 4, keys=[7]))
    assert kv.get_computed_blocks(make_req(1, 4, keys=[7]))[1] == 0


def test_lookup_stops_at_first_miss():
    """Blocks after the first mismatching block do not hit even if their keys are cached."""
    kv = KVCacheManager(64, BS)
    _computed(kv, make_req(0, 16, keys=[1, 2, 3, 4]))
    _, n = kv.get_computed_blocks(make_req(1, 17, keys=[1, 9, 3, 4]))
    assert n == 4


def test_different_keys_do_not_hit():
    """Requests with unrelated blocks share nothing."""
    kv = KVCacheManager(64, BS)
    _computed(kv, make_req(0, 16))
    assert kv.get_computed_blocks(make_req(1, 16))[1] == 0


def _decode_twins(num_blocks):
    """Two managers holding the same request mid-prompt (one short of a block boundary)."""
    out = []
    for _ in range(2):
        kv = KVCacheManager(num_blocks, BS)
        other = make_req(9, 8)
        _computed(kv, other)
        kv.free(other)  # two cached blocks in the free queue, so allocations evict
        req = make_req(0, 6, max_tokens=20)
        _computed(kv, req)
        req.num_output_tokens = 1  # one token sampled: the next step is a decode
        out.append((kv, req))
    return out


@pytest.mark.parametrize("num_blocks", [8, 4])
def test_allocate_decode_slot_is_allocate_slots_of_one_token(num_blocks):
    """Decoding token by token across block boundaries, allocate_decode_slot leaves the same
    tables, cached keys and free queue as allocate_slots(req, 1), and fails the same way."""
    (kv_a, a), (kv_b, b) = _decode_twins(num_blocks)
    for _ in range(12):
        ok_a = kv_a.allocate_decode_slot(a)
        ok_b = kv_b.allocate_slots(b, 1)
        assert ok_a == ok_b
        assert kv_a.req_to_blocks == kv_b.req_to_blocks
        assert kv_a.num_cached_block == kv_b.num_cached_block
        assert list(kv_a.pool.block_key) == list(kv_b.pool.block_key)
        assert kv_a.pool.free_queue() == kv_b.pool.free_queue()
        if not ok_a:
            break
        for r in (a, b):
            r.num_computed_tokens += 1
            r.num_output_tokens += 1
    assert ok_a == (num_blocks == 8)


def test_key_index_pages_stay_proportional_to_live_keys():
    """Writing keys on thousands of pages whose entries go stale keeps a bounded number of
    pages (sweeps recycle dead ones), and the live key stays readable throughout."""
    import numpy as np

    from simulator.engine.block_pool import NO_KEY
    from simulator.engine.key_index import _MIN_SWEEP, _SWEEP_GROWTH, PAGE, KeyIndex

    main_key = np.full(4, NO_KEY, np.int64)  # blocks 0..2, and the spare entry [-1]
    index = KeyIndex(main_key)
    live = 3 * PAGE + 5
    index.set(live, 1)
    main_key[1] = live
    for p in range(10, 5000):
        index.set(p * PAGE, 2)  # block 2 never holds these keys: stale at once
        assert index.get(live) == 1
    assert len(index.page_row) <= _SWEEP_GROWTH * _MIN_SWEEP


def test_freed_blocks_join_queue_tail_first():
    """A finished request's blocks are appended to the free queue last block first."""
    kv = KVCacheManager(16, BS)
    r = make_req(0, 12, keys=[1, 2, 3])
    blocks = list(_computed(kv, r))
    kv.free(r)
    assert kv.pool.free_queue()[-3:] == blocks[::-1]


def test_last_block_is_evicted_first_and_the_rest_stay_hittable():
    """Reusing one freed block evicts the request's last block; its first blocks still hit."""
    kv = KVCacheManager(5, BS)  # 4 usable blocks
    r = make_req(0, 12, keys=[1, 2, 3])
    _computed(kv, r)
    kv.free(r)
    other = make_req(1, 8)
    _computed(kv, other)  # takes the never-used block, then r's last block
    assert kv.get_computed_blocks(make_req(2, 13, keys=[1, 2, 3]))[1] == 8
    assert kv.pool.num_evictions == 1


def test_freed_blocks_stay_hittable_until_reused():
    """With room to spare, a freed request's blocks all still hit."""
    kv = KVCacheManager(64, BS)
    r = make_req(0, 12, keys=[1, 2, 3])
    _computed(kv, r)
    kv.free(r)
    assert kv.get_computed_blocks(make_req(1, 13, keys=[1, 2, 3]))[1] == 12


def test_hit_revives_a_free_block_and_takes_a_reference():
    """Allocating with cache-hit blocks pulls them out of the free queue with ref_cnt 1."""
    kv = KVCacheManager(16, BS)
    r = make_req(0, 8, keys=[1, 2])
    old = list(_computed(kv, r))
    kv.free(r)
    r2 = make_req(1, 9, keys=[1, 2])
    hits, n = kv.get_computed_blocks(r2)
    assert hits == old and n == 8
    assert kv.allocate_slots(r2, 1, n, hits)
    assert kv.req_to_blocks[1][:2] == old
    assert all(kv.pool.ref_cnt[b] == 1 for b in old)
    assert not set(old) & set(kv.pool.free_queue())


def test_shared_hit_blocks_count_references():
    """Two live requests hitting the same blocks hold them with ref_cnt 2, freed only by both."""
    kv = KVCacheManager(16, BS)
    a = make_req(0, 9, keys=[1, 2])
    shared = list(_computed(kv, a))[:2]
    b = make_req(1, 9, keys=[1, 2])
    hits, n = kv.get_computed_blocks(b)
    assert kv.allocate_slots(b, 1, n, hits)
    assert [kv.pool.ref_cnt[x] for x in shared] == [2, 2]
    kv.free(a)
    assert not set(shared) & set(kv.pool.free_queue())
    kv.free(b)
    assert set(shared) <= set(kv.pool.free_queue())


def test_evictable_hit_blocks_are_not_counted_as_free():
    """allocate_slots counts free-queue hit blocks as taken and fails without side effects."""
    kv = KVCacheManager(5, BS)  # 4 usable
    r = make_req(0, 8, keys=[1, 2])
    _computed(kv, r)
    kv.free(r)
    big = make_req(1, 20, keys=[1, 2])  # needs 5 blocks: 2 hits + 3 new > 4 - 2
    hits, n = kv.get_computed_blocks(big)
    assert n == 8
    queue = kv.pool.free_queue()
    assert not kv.allocate_slots(big, 12, n, hits)
    assert kv.pool.free_queue() == queue and kv.pool.num_free == 4
    assert 1 not in kv.req_to_blocks


def test_null_block_is_never_allocated():
    """Block 0 is reserved: every usable block can be allocated, block 0 never, then it fails."""
    pool = BlockPool(8)
    got = pool.get_new_blocks(7)
    assert sorted(got) == list(range(1, 8))
    with pytest.raises(RuntimeError):
        pool.get_new_blocks(1)


def test_block_freed_too_often_raises():
    """Freeing a block twice is an error, not a silent negative count."""
    pool = BlockPool(4)
    b = pool.get_new_blocks(1)
    pool.free_blocks(b)
    with pytest.raises(RuntimeError):
        pool.free_blocks(b)


def test_prefix_caching_disabled_never_hits():
    """With enable_prefix_caching off, identical content never hits."""
    kv = KVCacheManager(64, BS, enable_caching=False)
    r = make_req(0, 12, keys=[1, 2, 3])
    _computed(kv, r)
    kv.free(r)
    assert kv.get_computed_blocks(make_req(1, 13, keys=[1, 2, 3]))[1] == 0


# --- through the whole simulation -----------------------------------------------------------


@pytest.mark.parametrize("new0,out0,new1", [(64, 16, 10), (50, 7, 1), (15, 1, 3), (33, 31, 16), (1, 1, 1)])
def test_next_call_hits_everything_but_the_last_token(ff, new0, out0, new1):
    """Call k+1 gets cached_tokens == floor((prompt_k + out_k - 1) / bs) * bs with a big KV."""
    bs = 16
    p = program("a", 0.0, [call(new0, out0, tool_s=0.5), call(new1, 4, tool_s=0.2), call(5, 2)])
    res, _ = run_sim([p], make_deployment(block_size=bs), fast_forward=ff)
    rows = rows_by_call(res)
    prompts = p.all_input_tokens()
    assert rows[("a", 0)]["cached_tokens"] == 0
    for k in (1, 2):
        prev_out = p.calls[k - 1].output_tokens
        expect = min((prompts[k - 1] + prev_out - 1) // bs, (prompts[k] - 1) // bs) * bs
        assert rows[("a", k)]["cached_tokens"] == expect


def test_same_prefix_id_shares_its_full_blocks(ff):
    """A second program with the same prefix id hits the prefix's full blocks (100 tokens -> 96)."""
    progs = [program("a", 0.0, [call(20, 4)], prefix=("sys", 100)),
             program("b", 1.0, [call(30, 4)], prefix=("sys", 100))]
    rows = rows_by_call(run_sim(progs, fast_forward=ff)[0])
    assert rows[("b", 0)]["cached_tokens"] == 96


def test_different_prefix_ids_share_nothing(ff):
    """Programs whose prefixes have different ids get no hit, whatever their lengths."""
    progs = [program("a", 0.0, [call(20, 4)], prefix=("sys-a", 100)),
             program("b", 1.0, [call(30, 4)], prefix=("sys-b", 100))]
    rows = rows_by_call(run_sim(progs, fast_forward=ff)[0])
    assert rows[("b", 0)]["cached_tokens"] == 0


def test_programs_without_prefix_share_nothing(ff):
    """Two programs without a prefix never hit each other's blocks."""
    progs = [program("a", 0.0, [call(100, 4)]), program("b", 1.0, [call(100, 4)])]
    rows = rows_by_call(run_sim(progs, fast_forward=ff)[0])
    assert rows[("b", 0)]["cached_tokens"] == 0


def _hash_prog(pid, arrival, hids, tb=16, inp=None, out=2):
    inp = inp if inp is not None else len(hids) * tb + 5
    return program(pid, arrival, [call(0, out, input_tokens=inp, hash_ids=hids)], block_size=tb)


def test_equal_hash_ids_hit(ff):
    """A later call with the same hash_ids hits all its full blocks but the last token's."""
    progs = [_hash_prog("a", 0.0, [1, 2, 3, 4]), _hash_prog("b", 1.0, [1, 2, 3, 4])]
    rows = rows_by_call(run_sim(progs, fast_forward=ff)[0])
    assert rows[("b", 0)]["cached_tokens"] == 64


def test_different_hash_ids_do_not_hit(ff):
    """Different first hash id: nothing hits, even if later ids match (chained hashes)."""
    progs = [_hash_prog("a", 0.0, [1, 2, 3, 4]), _hash_prog("b", 1.0, [9, 2, 3, 4])]
    rows = rows_by_call(run_sim(progs, fast_forward=ff)[0])
    assert rows[("b", 0)]["cached_tokens"] == 0


def test_hash_ids_hit_up_to_first_difference(ff):
    """Hash ids [1,2,3] vs [1,2,9] share two blocks."""
    progs = [_hash_prog("a", 0.0, [1, 2, 3]), _hash_prog("b", 1.0, [1, 2, 9])]
    rows = rows_by_call(run_sim(progs, fast_forward=ff)[0])
    assert rows[("b", 0)]["cached_tokens"] == 32


def test_hash_ids_with_trace_blocks_larger_than_engine_blocks(ff):
    """Trace blocks of 32 tokens over 16-token engine blocks: [1,2] vs [1,3] share 32 tokens."""
    progs = [_hash_prog("a", 0.0, [1, 2], tb=32), _hash_prog("b", 1.0, [1, 3], tb=32)]
    rows = rows_by_call(run_sim(progs, fast_forward=ff)[0])
    assert rows[("b", 0)]["cached_tokens"] == 32



def _same_as_fresh(kv: KVCacheManager, req):
    """req's lookup (answered from the manager's last one when that was req's) equals a fresh
    lookup; afterwards req's is the last lookup again."""
    hits, n = kv.get_computed_blocks(req)
    clone = Request(req.request_id + 1000, req.num_prompt_tokens, req.max_tokens, 0.0, req.key_base,
                    hash_keys=req.hash_keys)
    assert (hits, n) == kv.get_computed_blocks(clone)
    kv.get_computed_blocks(req)
    return hits


@pytest.mark.parametrize("keys", [None, [11, 12, 13, 14, 15, 16]])
def test_repeated_lookup_sees_evictions_and_new_blocks(keys):
    """A waiting request looked up again (refused blocks in between) gets a fresh answer
    after one of its hit blocks is evicted, and after its first miss gets cached."""
    kv = KVCacheManager(8, BS)  # 7 usable blocks
    r0 = Request(0, 17, 4, 0.0, key_base=1 << 32, hash_keys=keys)
    _computed(kv, r0)  # 4 full blocks cached, a fifth one partial
    kv.free(r0)
    r1 = Request(1, 25, 4, 0.0, key_base=1 << 32, hash_keys=keys)
    assert len(_same_as_fresh(kv, r1)) == 4
    assert len(_same_as_fresh(kv, r1)) == 4  # nothing changed
    # The free queue is 6, 7, then r0's blocks tail first: a 4-block allocation takes
    # r0's partial block and evicts its fourth full block.
    r2 = make_req(2, 16)
    _computed(kv, r2)
    assert len(_same_as_fresh(kv, r1)) == 3
    kv.free(r2)
    # Another call of the program computes blocks 3 and 4: r1's first miss gets cached.
    r3 = Request(3, 21, 4, 0.0, key_base=1 << 32, hash_keys=keys)
    hits, n = kv.get_computed_blocks(r3)
    kv.get_computed_blocks(r1)
    assert kv.allocate_slots(r3, r3.num_tokens - n, n, hits)
    r3.num_computed_tokens = r3.num_tokens
    assert len(_same_as_fresh(kv, r1)) == 5


# --- hybrid models: linear-attention state blocks ----------------------------------------------


def test_state_blocks_are_taken_with_a_sequence_first_blocks_and_freed_with_them():
    """A hybrid model's sequence holds `state_blocks` blocks besides its attention blocks
    (vLLM's Mamba groups): admission needs room for both, the state is never cached (another
    request with the same prompt hits only attention blocks), and finishing or preempting
    (free) or handing the blocks to a retention policy (take_blocks) returns the state."""
    kv = KVCacheManager(10, 4, state_blocks=3)
    keys = [101, 102, 103]
    a = make_req(0, 12, keys=keys)                       # 3 attention blocks + 3 state blocks
    assert kv.allocate_slots(a, 12)
    assert kv.pool.num_free == 10 - 6 - 1                # the pool's null block is never free
    b = make_req(1, 9)                                   # needs 3 + 3 > 3 free
    assert not kv.allocate_slots(b, 9)
    assert kv.pool.num_free == 3 and 1 not in kv.req_to_state
    c = make_req(2, 13, keys=keys)
    hits, n = kv.lookup(c)
    assert n == 12 and len(hits) == 3                    # attention blocks hit; no state block is cached
    kv.free(a)
    assert kv.pool.num_free == 9
    assert kv.allocate_slots(c, 1, 12, hits)             # 3 hits (out of the free queue) + 1 new + 3 state
    assert kv.pool.num_free == 9 - 3 - 1 - 3 and len(kv.req_to_state[2]) == 3
    kv.take_blocks(c)                                    # a policy keeps the KV; the state goes back
    assert 2 not in kv.req_to_state and kv.pool.num_free == 2 + 3


def test_hybrid_state_blocks_cap_how_many_sequences_run():
    """With 3 state blocks per sequence a pool of 13 blocks runs 3 one-block sequences at once
    (4 blocks each), not 12; every call still completes and every block comes back."""
    import dataclasses

    progs = [program(f"p{i}", 0.0, [call(3, 2)]) for i in range(6)]
    dep = make_deployment(num_gpu_blocks=13, block_size=4, max_num_seqs=8)
    dep = dataclasses.replace(dep, engine=dataclasses.replace(dep.engine, state_blocks_per_seq=3))
    res, sim = run_sim(progs, dep)
    rows = rows_by_call(res)
    assert all(r["status"] == "ok" for r in rows.values())
    firsts = sorted(r["first_token_s"] for r in rows.values())
    assert firsts[2] < firsts[3]                          # only three ran in the first step
    inst = sim.instances[0]
    assert inst.kv.pool.num_free == 12 and not inst.kv.req_to_state
