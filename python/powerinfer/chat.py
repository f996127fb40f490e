"""``powerinfer chat``: a terminal conversation through the model's own chat template."""
from __future__ import annotations

import re
import sys
from typing import Any, Optional, TextIO

import llama_cpp

_CONTEXT_FULL = re.compile(r"Requested tokens \(\d+\) exceed context window")
COMMANDS = "/reset clears the conversation, /exit ends it"


def chat_loop(llm: llama_cpp.Llama, stdin: TextIO, stdout: TextIO, *, system: Optional[str] = None,
              max_tokens: Optional[int] = None, temperature: float = 0.8, seed: int = -1) -> int:
    """Read one user message per line from `stdin`, stream each reply to `stdout`.

    Ends at end of input, ``/exit`` or Ctrl-C at the prompt; Ctrl-C during a reply stops that
    reply only. When the conversation outgrows the context, the oldest exchanges are dropped.
    """
    interactive = stdin.isatty()
    start: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    if interactive:
        print(f"[{COMMANDS}]", file=sys.stderr)
    while True:
        try:
            if interactive:
                stdout.write("> ")
                stdout.flush()
            line = stdin.readline()
        except KeyboardInterrupt:
            stdout.write("\n")
            return 0
        if not line:
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            messages = list(start)
            continue
        messages.append({"role": "user", "content": text})
        reply = _reply(llm, messages, stdout, max_tokens=max_tokens, temperature=temperature, seed=seed)
        if reply is None:
            messages.pop()  # not answered: the message alone is too long for the context
        else:
            messages.append({"role": "assistant", "content": reply})


def _reply(llm: llama_cpp.Llama, messages: list[dict[str, Any]], stdout: TextIO, *,
           max_tokens: Optional[int], temperature: float, seed: int) -> Optional[str]:
    """Stream one assistant reply; returns its text (partial if interrupted), None if the
    latest message does not fit in the context even alone."""
    while True:
        parts: list[str] = []
        stream = llm.create_chat_completion(messages, stream=True, max_tokens=max_tokens,  # type: ignore[arg-type]
                                            temperature=temperature, seed=seed)
        try:
            for chunk in stream:
                piece = chunk["choices"][0]["delta"].get("content") or ""  # type: ignore[index, union-attr]
                parts.append(piece)
                stdout.write(piece)
                stdout.flush()
        except KeyboardInterrupt:
            stream.close()  # type: ignore[union-attr]
            stdout.write("\n[interrupted]\n")
            return "".join(parts)
        except ValueError as exc:
            if not _CONTEXT_FULL.search(str(exc)):
                raise
            if not _drop_oldest_exchange(messages):
                print(f"[message too long for the context ({llm.n_ctx()} tokens)]", file=sys.stderr)
                return None
            print("[context full: dropped the oldest exchange]", file=sys.stderr)
            continue
        stdout.write("\n")
        return "".join(parts)


def _drop_oldest_exchange(messages: list[dict[str, Any]]) -> bool:
    """Remove the first user message and the assistant reply after it (keeping the system
    message and the latest user message). False if there is nothing left to drop."""
    first = 1 if messages and messages[0]["role"] == "system" else 0
    if len(messages) - first <= 1:
        return False
    del messages[first]
    if len(messages) - first > 1 and messages[first]["role"] == "assistant":
        del messages[first]
    return True
