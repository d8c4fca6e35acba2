"""DeepSeek V4 chat-prompt rendering, as ds4 does it (MODEL.md §7.4).

Control tokens come only from the template.  Every text part (system text, user
prompt, assistant content, reasoning, tool results) is tokenized with
``special=False``, so a ``<think>`` or ``<｜User｜>`` typed by a user stays ordinary
BPE text.

Single turn (ds4's CLI, :func:`render_prompt`)::

    BOS · [think-max prefix] · [system] · <｜User｜> · prompt · <｜Assistant｜> · (<think> | </think>)

Each text part is tokenized on its own (the think-max prefix and the system text too).

Multi turn (ds4's server, :func:`render_chat`)::

    BOS · [think-max prefix] · system messages joined by "\\n\\n"
    user:      <｜User｜> content
    tool:      <｜User｜> (once per run of tool results) <tool_result>content</tool_result>
    assistant: [<｜Assistant｜> (<think>reasoning</think> | </think>)] content <｜end▁of▁sentence｜>
    final:     <｜Assistant｜> (<think> | </think>)      (only when the last turn is user/tool)

The assistant header is written only after a user/tool turn.  Reasoning of an assistant
turn is kept only in thinking mode and only after the last user/tool message (plain
chats drop earlier reasoning).  Text between two control tokens is tokenized as one
span, as the server does.  Tool calls (DSML) and tool schemas are not supported.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ds4jax.errors import DS4Error
from ds4jax.tokenizer import (
    ASSISTANT_TEXT,
    BOS_TEXT,
    EOS_TEXT,
    THINK_END_TEXT,
    THINK_START_TEXT,
    USER_TEXT,
    Tokenizer,
)

DEFAULT_SYSTEM = "You are a helpful assistant"

THINK_MODES = ("none", "high", "max")

# DeepSeek recommends Think Max only with a context of at least 384K tokens.
THINK_MAX_MIN_CONTEXT = 393216

# Exact text (MODEL.md §7.4): three lines, each ending in "\n", then a blank line.
THINK_MAX_PREFIX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem"
    " to resolve the root cause, rigorously stress-testing your logic against all potential"
    " paths, edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate"
    " step, considered alternative, and rejected hypothesis to ensure absolutely no"
    " assumption is left unchecked.\n"
    "\n"
)

TOOL_RESULT_OPEN = "<tool_result>"
TOOL_RESULT_CLOSE = "</tool_result>"

SYSTEM_ROLES = ("system", "developer")
TOOL_ROLES = ("tool", "function")
ROLES = (*SYSTEM_ROLES, "user", "assistant", *TOOL_ROLES)


def effective_think_mode(
    think: str, ctx: int | None = None, think_max_min_context: int = THINK_MAX_MIN_CONTEXT
) -> str:
    """``think`` validated; "max" becomes "high" when ``ctx`` < ``think_max_min_context``.

    ``ctx=None`` means "no context size given": no downgrade.
    """
    if think not in THINK_MODES:
        raise DS4Error(f"unknown think mode {think!r} (expected one of {', '.join(THINK_MODES)})")
    if think == "max" and ctx is not None and max(int(ctx), 0) < think_max_min_context:
        return "high"
    return think


@dataclass(frozen=True)
class _Control:
    """A control token of the template, identified by its exact string."""

    text: str


_BOS = _Control(BOS_TEXT)
_EOS = _Control(EOS_TEXT)
_USER = _Control(USER_TEXT)
_ASSISTANT = _Control(ASSISTANT_TEXT)
_THINK_START = _Control(THINK_START_TEXT)
_THINK_END = _Control(THINK_END_TEXT)

Segment = _Control | str


@dataclass(frozen=True)
class Message:
    """One chat message. ``reasoning`` is used for assistant messages only."""

    role: str
    content: str = ""
    reasoning: str = ""

    def __post_init__(self):
        if self.role not in ROLES:
            raise DS4Error(f"unknown chat role {self.role!r} (expected one of {', '.join(ROLES)})")


class Conversation:
    """A mutable list of :class:`Message` with helpers to append turns and render."""

    def __init__(self, messages: Iterable[Message] = ()):
        self.messages: list[Message] = list(messages)

    def system(self, content: str) -> Conversation:
        self.messages.append(Message("system", content))
        return self

    def user(self, content: str) -> Conversation:
        self.messages.append(Message("user", content))
        return self

    def assistant(self, content: str, reasoning: str = "") -> Conversation:
        self.messages.append(Message("assistant", content, reasoning))
        return self

    def tool(self, content: str) -> Conversation:
        self.messages.append(Message("tool", content))
        return self

    def render(self, tok: Tokenizer, think: str = "none", ctx: int | None = None,
               think_max_min_context: int = THINK_MAX_MIN_CONTEXT) -> list[int]:
        return render_chat(tok, self.messages, think, ctx, think_max_min_context)

    def render_text(self, think: str = "none", ctx: int | None = None,
                    think_max_min_context: int = THINK_MAX_MIN_CONTEXT) -> str:
        return render_chat_text(self.messages, think, ctx, think_max_min_context)

    def __len__(self) -> int:
        return len(self.messages)

    def __iter__(self):
        return iter(self.messages)


# ---------------------------------------------------------------------- segments
def _prompt_segments(prompt: str, system: str, think: str) -> list[Segment]:
    segs: list[Segment] = [_BOS]
    if think == "max":
        segs.append(THINK_MAX_PREFIX)
    if system:
        segs.append(system)
    segs += [_USER, prompt, _ASSISTANT, _THINK_START if think != "none" else _THINK_END]
    return segs


def _escape_tool_result(text: str) -> str:
    # Tool output is data; only the wrapper's own closing tag must not appear in it.
    return text.replace(TOOL_RESULT_CLOSE, "&lt;" + TOOL_RESULT_CLOSE[1:])


def _as_message(m: Message | dict) -> Message:
    if isinstance(m, Message):
        return m
    if isinstance(m, dict):
        return Message(m.get("role", ""), m.get("content") or "",
                       m.get("reasoning") or m.get("reasoning_content") or "")
    raise DS4Error(f"chat message must be a Message or a dict, not {type(m).__name__}")


def _chat_segments(messages: Sequence[Message | dict], think: str) -> list[Segment]:
    msgs = [_as_message(m) for m in messages]
    thinking = think != "none"
    tool_context = any(m.role in TOOL_ROLES for m in msgs)
    last_user = max((i for i, m in enumerate(msgs) if m.role == "user" or m.role in TOOL_ROLES), default=-1)

    segs: list[Segment] = [_BOS]
    if think == "max":
        segs.append(THINK_MAX_PREFIX)
    segs.append("\n\n".join(m.content for m in msgs if m.role in SYSTEM_ROLES))

    pending_assistant = False
    in_tool_results = False
    for i, m in enumerate(msgs):
        if m.role in SYSTEM_ROLES:
            continue
        if m.role == "user":
            segs += [_USER, m.content]
            pending_assistant, in_tool_results = True, False
        elif m.role in TOOL_ROLES:
            if not in_tool_results:
                segs.append(_USER)
            segs.append(TOOL_RESULT_OPEN + _escape_tool_result(m.content) + TOOL_RESULT_CLOSE)
            pending_assistant, in_tool_results = True, True
        else:  # assistant
            if pending_assistant:
                segs.append(_ASSISTANT)
                if thinking and (tool_context or i > last_user):
                    segs += [_THINK_START, m.reasoning, _THINK_END]
                else:
                    segs.append(_THINK_END)
            segs += [m.content, _EOS]
            pending_assistant, in_tool_results = False, False
    if pending_assistant:
        segs += [_ASSISTANT, _THINK_START if thinking else _THINK_END]
    return segs


def _segments_text(segs: Iterable[Segment]) -> str:
    return "".join(s.text if isinstance(s, _Control) else s for s in segs)


def _control_id(tok: Tokenizer, c: _Control) -> int:
    return {
        BOS_TEXT: tok.bos_id,
        EOS_TEXT: tok.eos_id,
        USER_TEXT: tok.user_id,
        ASSISTANT_TEXT: tok.assistant_id,
        THINK_START_TEXT: tok.think_start_id,
        THINK_END_TEXT: tok.think_end_id,
    }[c.text]


def _segments_ids(tok: Tokenizer, segs: Iterable[Segment], merge_text: bool) -> list[int]:
    out: list[int] = []
    pending: list[str] = []

    def flush():
        if pending:
            out.extend(tok.encode("".join(pending), special=False))
            pending.clear()

    for s in segs:
        if isinstance(s, _Control):
            flush()
            out.append(_control_id(tok, s))
        else:
            pending.append(s)
            if not merge_text:
                flush()
    flush()
    return out


# ---------------------------------------------------------------------- public API
def render_prompt(
    tok: Tokenizer,
    prompt: str,
    system: str = "",
    think: str = "none",
    ctx: int | None = None,
    think_max_min_context: int = THINK_MAX_MIN_CONTEXT,
) -> list[int]:
    """Token ids of a single-turn prompt, as ds4's CLI builds it (each text part tokenized alone)."""
    think = effective_think_mode(think, ctx, think_max_min_context)
    return _segments_ids(tok, _prompt_segments(prompt, system, think), merge_text=False)


def render_text(
    prompt: str,
    system: str = "",
    think: str = "none",
    ctx: int | None = None,
    think_max_min_context: int = THINK_MAX_MIN_CONTEXT,
) -> str:
    """The single-turn prompt of :func:`render_prompt` as a string (control tokens literal)."""
    think = effective_think_mode(think, ctx, think_max_min_context)
    return _segments_text(_prompt_segments(prompt, system, think))


def render_chat(
    tok: Tokenizer,
    messages: Sequence[Message | dict],
    think: str = "none",
    ctx: int | None = None,
    think_max_min_context: int = THINK_MAX_MIN_CONTEXT,
) -> list[int]:
    """Token ids of a multi-turn conversation, as ds4's server renders it."""
    think = effective_think_mode(think, ctx, think_max_min_context)
    return _segments_ids(tok, _chat_segments(messages, think), merge_text=True)


def render_chat_text(
    messages: Sequence[Message | dict],
    think: str = "none",
    ctx: int | None = None,
    think_max_min_context: int = THINK_MAX_MIN_CONTEXT,
) -> str:
    """The conversation of :func:`render_chat` as a string (control tokens literal)."""
    think = effective_think_mode(think, ctx, think_max_min_context)
    return _segments_text(_chat_segments(messages, think))
