"""The broker's mailbox: askers wait for answers, or give up, without running the I/O."""

from __future__ import annotations

import trio
import trio.testing

from trio_ws.brokers.mailbox import Mailbox


async def test_questions_that_arrive_together_are_taken_together() -> None:
    mailbox: Mailbox[str, str] = Mailbox()
    answers: list[str | None] = []

    async def ask(question: str) -> None:
        answers.append(await mailbox.ask(question))

    async with trio.open_nursery() as nursery:
        for question in ("a", "b", "c"):
            nursery.start_soon(ask, question)
        await trio.testing.wait_all_tasks_blocked()
        taken = await mailbox.take_all()
        assert sorted(request.question for request in taken) == ["a", "b", "c"]
        for request in taken:
            request.reply(request.question.upper())
    assert sorted(a for a in answers if a is not None) == ["A", "B", "C"]


async def test_a_question_whose_asker_was_cancelled_is_dropped_unread(
    autojump_clock: trio.testing.MockClock,
) -> None:
    mailbox: Mailbox[str, str] = Mailbox()
    with trio.move_on_after(1):
        await mailbox.ask("gone")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(mailbox.ask, "wanted")
        await trio.testing.wait_all_tasks_blocked()
        taken = await mailbox.take_all()
        assert [request.question for request in taken] == ["wanted"]
        taken[0].reply("yes")


async def test_giving_up_answers_every_waiting_asker_with_none() -> None:
    mailbox: Mailbox[str, str] = Mailbox()
    answers: list[str | None] = []

    async def ask() -> None:
        answers.append(await mailbox.ask("anyone?"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        nursery.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        mailbox.give_up()
    assert answers == [None, None]


async def test_a_posted_question_is_taken_in_order_with_the_asked_ones() -> None:
    mailbox: Mailbox[str, str] = Mailbox()
    answers: list[str | None] = []

    async def ask(question: str) -> None:
        answers.append(await mailbox.ask(question))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask, "claim 1")
        await trio.testing.wait_all_tasks_blocked()
        mailbox.post("release 1")  # nobody waits for it
        nursery.start_soon(ask, "claim 2")
        await trio.testing.wait_all_tasks_blocked()
        taken = await mailbox.take_all()
        assert [request.question for request in taken] == ["claim 1", "release 1", "claim 2"]
        for request in taken:
            request.reply("ok")
    assert answers == ["ok", "ok"]
