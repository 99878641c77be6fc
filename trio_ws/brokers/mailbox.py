"""Questions for a broker's own task, from tasks that may be cancelled at any moment.

A WebSocket handler that needs Redis (a resuming client's history) must not run the command
itself: cancelled halfway (its client went away), a command leaves coredis's connection pool one
connection short, and enough of those leave every later command waiting for a connection that
never comes. So the handler asks, and the broker's long-lived task runs the command and answers.
A handler cancelled while it waits only gives up on the answer; its question is dropped unread
if the broker has not taken it yet.

Questions that arrive together are taken together (:meth:`Mailbox.take_all`), so one command can
answer many.
"""

from __future__ import annotations

import collections
from typing import Generic, TypeVar

import trio

Question = TypeVar("Question")
Answer = TypeVar("Answer")


class Request(Generic[Question, Answer]):
    """One question and, once given, its answer."""

    __slots__ = ("_answered", "abandoned", "answer", "question")

    def __init__(self, question: Question) -> None:
        self.question = question
        self.answer: Answer | None = None
        #: The asker stopped waiting: nobody will read the answer.
        self.abandoned = False
        self._answered = trio.Event()

    def reply(self, answer: Answer) -> None:
        """Answer (only the first answer counts)."""
        if not self._answered.is_set():
            self.answer = answer
            self._answered.set()

    def give_up(self) -> None:
        """No answer will come (the broker went down): the asker gets None."""
        self._answered.set()

    async def wait(self) -> None:
        await self._answered.wait()


class Mailbox(Generic[Question, Answer]):
    """Questions waiting for the broker's task; see the module docstring."""

    def __init__(self) -> None:
        self._waiting: collections.deque[Request[Question, Answer]] = collections.deque()
        self._arrived = trio.Event()

    async def ask(self, question: Question) -> Answer | None:
        """Wait for the answer; None if the broker gave up on the question (it went down)."""
        request: Request[Question, Answer] = Request(question)
        self._waiting.append(request)
        self._arrived.set()
        try:
            await request.wait()
        finally:
            request.abandoned = True  # answered, or cancelled: the broker may forget it
        return request.answer

    def post(self, question: Question) -> None:
        """Leave a question that nobody waits for (its answer is dropped); it is taken in
        order with the others."""
        self._waiting.append(Request(question))
        self._arrived.set()

    async def take_all(self) -> list[Request[Question, Answer]]:
        """Wait for questions, then take every one still wanted."""
        while True:
            while not self._waiting:
                self._arrived = trio.Event()
                await self._arrived.wait()
            taken = [request for request in self._waiting if not request.abandoned]
            self._waiting.clear()
            if taken:
                return taken

    def give_up(self) -> None:
        """Answer every waiting question with None (the broker went down)."""
        while self._waiting:
            self._waiting.popleft().give_up()
