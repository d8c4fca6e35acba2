"""Interactive multi-turn chat for the command line (``python -m ds4jax.main`` with no prompt).

Lines typed are user turns; commands start with ``/``. Each turn re-renders the whole
conversation with ds4's chat template (earlier reasoning dropped) and generates the
assistant's answer, streamed. Ctrl-C stops the current answer (what was generated is
kept); Ctrl-C or Ctrl-D at the prompt leaves. Without a terminal, stdin lines are turns.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from ds4jax.chat import Conversation
from ds4jax.errors import DS4Error

HELP = """commands:
  /help        this text
  /think       thinking on (think-high; /think max for think-max)
  /nothink     thinking off
  /ctx N       context size N tokens (clears nothing; next turn recompiles)
  /clear       forget the conversation
  /quit        leave (also Ctrl-D)"""


class ChatSession:
    """State of one chat: the conversation, the think mode, and a generate function
    ``generate(ids, on_token) -> list[int]`` supplied by the CLI (plain or speculative)."""

    def __init__(self, tokenizer, system: str, think: str, ctx: int,
                 make_generator: Callable[[int], Callable], out=sys.stdout, err=sys.stderr):
        self.tok, self.system, self.think, self.ctx = tokenizer, system, think, ctx
        self.make_generator = make_generator
        self.generate = make_generator(ctx)
        self.conv = Conversation()
        if system:
            self.conv.system(system)
        self.out, self.err = out, err

    def command(self, line: str) -> bool:
        """Handle a /command; False means quit."""
        parts = line.split()
        cmd, args = parts[0], parts[1:]
        if cmd in ("/quit", "/exit"):
            return False
        if cmd == "/help":
            print(HELP, file=self.out)
        elif cmd == "/think":
            self.think = "max" if args[:1] == ["max"] else "high"
            print(f"thinking: {self.think}", file=self.out)
        elif cmd == "/nothink":
            self.think = "none"
            print("thinking: off", file=self.out)
        elif cmd == "/clear":
            self.conv = Conversation()
            if self.system:
                self.conv.system(self.system)
            print("conversation cleared", file=self.out)
        elif cmd == "/ctx":
            if len(args) != 1 or not args[0].isdigit() or int(args[0]) < 1:
                print("usage: /ctx N (a positive number of tokens)", file=self.out)
            else:
                try:
                    self.generate = self.make_generator(int(args[0]))
                    self.ctx = int(args[0])
                    print(f"context: {self.ctx} tokens", file=self.out)
                except DS4Error as e:
                    print(f"error: {e}", file=self.out)
        else:
            print(f"unknown command {cmd} (/help lists them)", file=self.out)
        return True

    def turn(self, text: str) -> str:
        """One user message -> the assistant's answer (streamed to ``out`` as it comes)."""
        from ds4jax.tokenizer import StreamDecoder

        self.conv.user(text)
        ids = self.conv.render(self.tok, think=self.think, ctx=self.ctx)
        stream = StreamDecoder(self.tok)
        pieces: list[str] = []

        def on_token(t: int) -> None:
            if t != self.tok.eos_id:
                s = stream.feed(t)
                pieces.append(s)
                self.out.write(s)
                self.out.flush()

        try:
            self.generate(ids, on_token)
        except KeyboardInterrupt:
            self.out.write("\n[stopped]")
        except DS4Error as e:
            self.conv = Conversation(list(self.conv)[:-1])  # drop the turn that did not fit
            print(f"error: {e}", file=self.out)
            return ""
        pieces.append(stream.flush())
        self.out.write(pieces[-1] + "\n")
        self.out.flush()
        answer = "".join(pieces)
        if self.think != "none" and "</think>" in answer:  # keep only the answer, as ds4 does
            answer = answer.split("</think>", 1)[1]
        self.conv.assistant(answer.strip())
        return answer

    def run(self, stdin=sys.stdin) -> None:
        interactive = stdin.isatty()
        if interactive:
            print("ds4jax chat: type a message, /help for commands, Ctrl-D to leave", file=self.out)
        while True:
            try:
                if interactive:
                    line = input("> ")
                else:
                    line = stdin.readline()
                    if not line:
                        break
            except (EOFError, KeyboardInterrupt):
                print(file=self.out)
                break
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    break
                continue
            self.turn(line)
