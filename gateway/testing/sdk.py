"""Reading the official ``openai`` SDK's streamed answers in tests, sync or async alike."""

from __future__ import annotations

from typing import Any


class StreamedCalls:
    """A streamed chat answer put back together: its text, finish reason and tool calls. Each
    call's id and name come in its first delta (OpenAI's order), then argument fragments."""

    def __init__(self) -> None:
        self.text = ""
        self.finish: str | None = None
        self.heads: dict[int, tuple[str, str]] = {}
        self.parts: dict[int, list[str]] = {}

    def add(self, chunk: Any) -> None:
        """One ``ChatCompletionChunk``."""
        delta = chunk.choices[0].delta
        self.text += delta.content or ""
        for tc in delta.tool_calls or []:
            if tc.id:
                self.heads[tc.index] = (tc.function.name if tc.function else "", tc.id)
            self.parts.setdefault(tc.index, []).append(
                (tc.function.arguments or "") if tc.function else "")
        self.finish = chunk.choices[0].finish_reason or self.finish

    def calls(self) -> list[tuple[str, str, str]]:
        """(name, arguments, id) per call, in index order."""
        return [(self.heads[i][0], "".join(self.parts[i]), self.heads[i][1])
                for i in sorted(self.heads)]
