"""The generation worker: events of one job, finish reasons, usage, the context limit, and the queue."""

from __future__ import annotations

import threading

import pytest

from lora_tune.serve.protocol import GenerationRequest, Sampling
from lora_tune.serve.worker import Failed, Finished, Job, Piece, Scheduler, Started, run_job


def request(prompt: str, max_tokens: int = 50, stop: list[str] | None = None) -> GenerationRequest:
    return GenerationRequest(model=None, sampling=Sampling(max_tokens=max_tokens, stop=stop or []), prompt=prompt)


def events(job: Job) -> list:
    found = []
    while not found or not isinstance(found[-1], (Finished, Failed)):
        found.append(job.events.get(timeout=10))
    return found


def answer(found: list) -> str:
    return "".join(e.text for e in found if isinstance(e, Piece))


def test_an_answer_that_ends_its_turn_finishes_with_stop_and_counts_tokens(scripted) -> None:
    job = Job(request("abc"))
    run_job(scripted(), job)
    found = events(job)
    assert isinstance(found[0], Started) and found[0].prompt_tokens == 3
    assert answer(found) == "cba"
    assert found[-1].finish_reason == "stop"
    assert found[-1].usage.as_json() == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}  # + END


def test_max_tokens_cuts_the_answer_with_length(scripted) -> None:
    job = Job(request("abcdef", max_tokens=2))
    run_job(scripted(), job)
    found = events(job)
    assert answer(found) == "fe" and found[-1].finish_reason == "length" and found[-1].usage.completion_tokens == 2


def test_a_stop_string_ends_generation_early(scripted) -> None:
    backend = scripted({"q": "one two three four"})
    job = Job(request("q", stop=[" three"]))
    run_job(backend, job)
    found = events(job)
    assert answer(found) == "one two" and found[-1].finish_reason == "stop"
    assert found[-1].usage.completion_tokens == len("one two three")  # generation stopped where the stop was seen


def test_the_answer_is_bounded_by_the_models_context(scripted) -> None:
    job = Job(request("abcd", max_tokens=50))
    run_job(scripted({"abcd": "x" * 20}, context_length=10), job)
    found = events(job)
    assert answer(found) == "xxxxxx" and found[-1].finish_reason == "length"


def test_a_prompt_longer_than_the_context_fails_with_400(scripted) -> None:
    job = Job(request("abcdefghijk"))
    run_job(scripted(context_length=10), job)
    [failed] = events(job)
    assert failed.error.status == 400 and failed.error.code == "context_length_exceeded"


def test_a_template_refusal_is_the_requests_failure(scripted) -> None:
    chat = GenerationRequest(
        model=None, sampling=Sampling(max_tokens=5), messages=[{"role": "assistant", "content": "x"}]
    )
    job = Job(chat)
    run_job(scripted(), job)
    [failed] = events(job)
    assert failed.error.status == 400 and failed.error.param == "messages"


def test_a_backend_crash_is_a_500_and_the_worker_goes_on(scripted) -> None:
    backend = scripted()
    backend.generate = lambda *args: 1 / 0
    job = Job(request("abc"))
    run_job(backend, job)
    assert events(job)[-1].error.status == 500


def test_concurrent_jobs_each_get_their_own_answer(scripted) -> None:
    scheduler = Scheduler(scripted(delay=0.001))
    prompts = [f"prompt number {i}" for i in range(8)]
    results: dict[str, str] = {}

    def ask(prompt: str) -> None:
        results[prompt] = answer(events(scheduler.submit(request(prompt))))

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {p: p[::-1] for p in prompts}
    assert scheduler.close(grace=1) == 0


def test_close_lets_a_job_finish_within_the_grace_period(scripted) -> None:
    scheduler = Scheduler(scripted(delay=0.01))
    job = scheduler.submit(request("x" * 20))
    assert scheduler.close(grace=10) == 0
    assert answer(events(job)) == "x" * 20


def test_close_ends_jobs_still_running_after_the_grace_period(scripted) -> None:
    backend = scripted(delay=0.05)
    scheduler = Scheduler(backend)
    running, waiting = scheduler.submit(request("y" * 200)), scheduler.submit(request("z"))
    assert backend.generating.wait(5)
    assert scheduler.close(grace=0.1) == 2
    assert events(running)[-1].error.code == "shutting_down"
    assert events(waiting)[-1].error.code == "shutting_down"
    with pytest.raises(Exception, match="shutting down"):
        scheduler.submit(request("late"))


def test_a_full_queue_answers_503(scripted) -> None:
    backend = scripted(delay=0.05)
    scheduler = Scheduler(backend, max_waiting=1)
    scheduler.submit(request("a" * 50))
    assert backend.generating.wait(5)
    scheduler.submit(request("b"))
    with pytest.raises(Exception, match="busy") as caught:
        scheduler.submit(request("c"))
    assert caught.value.status == 503
    scheduler.close(grace=0)
