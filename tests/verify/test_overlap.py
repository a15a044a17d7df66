"""The judge on its own thread: questions asked without waiting, replies collected when read, threads shared."""

from __future__ import annotations

import asyncio
import threading

import torch

from safesail.verify.checks import CheckSettings, Verifier
from safesail.verify.overlap import BackgroundJudge, ThreadGovernor, overlap_judge


def test_questions_asked_without_waiting_are_answered_while_the_caller_works_and_read_once():
    gate, calls = threading.Event(), []

    def judge(items):           # blocks until the main thread has gone on: proves the call did not wait
        assert gate.wait(10)
        calls.append(list(items))
        return [float(len(t)) for _, t in items]

    bg = BackgroundJudge(judge)
    v = Verifier(None, CheckSettings(), bg)
    v.prejudge([("topic", "ab"), ("topic", "abc")], wait=False)      # returns at once
    assert bg.busy and not calls
    v.prejudge([("topic", "ab")], wait=False)                        # already asked: not asked again
    gate.set()
    v.prejudge([("topic", "abcd"), ("topic", "ab")])                  # waits, collects, asks only the new one
    assert v._verdicts == {("topic", "ab"): 2.0, ("topic", "abc"): 3.0, ("topic", "abcd"): 4.0}
    assert calls == [[("topic", "ab"), ("topic", "abc")], [("topic", "abcd")]]
    assert not bg.busy
    bg.close()


def test_a_plain_judge_is_asked_at_once():
    v = Verifier(None, CheckSettings(), lambda items: [1.0] * len(items))
    v.prejudge([("t", "x")], wait=False)
    assert v._verdicts == {("t", "x"): 1.0}


def test_the_governor_gives_the_main_thread_fewer_torch_threads_while_the_judge_works():
    before = torch.get_num_threads()
    gate = threading.Event()
    bg = BackgroundJudge(lambda items: gate.wait(10) and items)
    gov = ThreadGovernor(bg, 2, 1)
    torch.set_num_threads(2)     # (under OMP_NUM_THREADS=1 the first switch would be no switch)
    try:
        fut = bg.submit(["q"])
        gov()
        assert torch.get_num_threads() == 1
        gate.set()
        fut.result()
        gov()
        assert torch.get_num_threads() == 2 and gov.switches == 2
    finally:
        torch.set_num_threads(before)
        bg.close()


def test_the_judges_torch_work_runs_on_one_thread_unless_the_main_thread_waits_for_it():
    loop = asyncio.new_event_loop()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        async def probe():
            return await asyncio.to_thread(torch.get_num_threads)

        bg, end = overlap_judge(lambda items: [loop.run_until_complete(probe()) for _ in items], loop)
        assert bg.submit(["a", "b"]).result() == [1, 1]      # the main thread works meanwhile: one thread
        assert bg(["a", "b"]) == [2, 2]                      # the main thread waits: the judge gets both
        assert bg.wait(bg.submit(["a"])) in ([1], [2])       # asked before the wait began: either
        assert bg.submit(["a"]).result() == [1]              # and back to one once nobody waits
        assert bg.executor.jobs_by_threads[1] >= 3 and bg.executor.jobs_by_threads[2] >= 2
        end()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
        loop.close()


def test_the_judge_engine_counter_reads_the_work_since_it_was_made():
    from types import SimpleNamespace

    from safesail.interpret.clients.local_engine import EngineStats
    from safesail.verify.overlap import judge_engine_counter

    stats = EngineStats(prompt_tokens=100, computed_tokens=80, forward_calls=3)
    client = SimpleNamespace(inner=SimpleNamespace(engine=SimpleNamespace(stats=stats)))   # a cache wrapper
    work = judge_engine_counter(client)
    stats.prompt_tokens, stats.computed_tokens, stats.forward_calls = 300, 130, 5
    assert work() == {"prompt_tokens": 200, "computed_tokens": 50, "forward_calls": 2, "prefix_reuse": 0.75}
    assert judge_engine_counter(SimpleNamespace())() is None and judge_engine_counter(None)() is None


def test_a_verifier_waiting_for_pending_replies_lends_the_judge_its_threads():
    loop = asyncio.new_event_loop()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    gate = threading.Event()
    try:
        async def probe():
            return await asyncio.to_thread(torch.get_num_threads)

        def judge(items):
            assert gate.wait(10)
            return [float(loop.run_until_complete(probe())) for _ in items]

        bg, end = overlap_judge(judge, loop)
        v = Verifier(None, CheckSettings(), bg)
        v.prejudge([("t", "x")], wait=False)
        threading.Timer(0.2, gate.set).start()               # the reply comes while the verifier waits
        v.prejudge([("t", "x")])
        assert v._verdicts == {("t", "x"): 2.0}
        assert not bg.waited_on
        end()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
        loop.close()


def test_judge_batches_sets_the_batch_of_the_back_end_behind_the_response_cache():
    from types import SimpleNamespace

    from safesail.verify.overlap import judge_batches

    local = SimpleNamespace(batch_size=4)
    cached = SimpleNamespace(inner=local)
    judge_batches(cached, None)
    assert local.batch_size == 4
    judge_batches(cached, 16)
    assert local.batch_size == 16 and not hasattr(cached, "batch_size")
    judge_batches(SimpleNamespace(inner=None), 16)        # no local engine: nothing to set
