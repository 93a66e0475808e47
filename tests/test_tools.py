"""Tools in the chat template, tool calls parsed out of replies, and stop strings over streamed text."""

from __future__ import annotations

import copy
import itertools
import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from dualpath_sdk.errors import InvalidInput
from dualpath_sdk.model.chat import (
    continuation_ids,
    continuation_text,
    encode_chat,
    normalize_messages,
    render_chat,
    template_knows_tools,
)
from dualpath_sdk.model.loader import default_model_dir
from dualpath_sdk.model.stops import StopStrings
from dualpath_sdk.model.tools import parse_tool_calls, tool_call_text, tool_schemas

RUN_TESTS: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "run_tests",
        "description": "Run the test suite under a path.",
        "parameters": {
            "type": "object",
            "properties": {"path": {"type": "string"}, "verbose": {"type": "boolean"}},
            "required": ["path"],
        },
    },
}
READ_FILE: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "read_file",
        "description": "Read a file.",
        "parameters": {"type": "object", "properties": {"file": {"type": "string"}}},
    },
}
TOOLS = [RUN_TESTS, READ_FILE]

CALL_REPLY: dict[str, Any] = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "run_tests", "arguments": '{"path": "tests/unit"}'},
        }
    ],
}
RESULT_TEXTS: dict[str, Any] = {
    "string": "3 failed, 12 passed",
    "parts": [{"type": "text", "text": "3 failed,"}, {"type": "text", "text": "12 passed"}],
}

# A template in the style of Qwen's: it renders tools, tool calls and the tool role itself.
NATIVE_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTOOLS:{% for t in tools %}{{ t | tojson }}{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{%- for m in messages %}"
    '{%- if m.role == "tool" %}<|im_start|>tool\n{{ m.content }}<|im_end|>\n'
    "{% elif m.tool_calls %}<|im_start|>assistant\n{% for c in m.tool_calls %}"
    "CALL {{ c.function.name }} {{ c.function.arguments | tojson }}{% endfor %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(default_model_dir())


@pytest.fixture(scope="module")
def native_tokenizer() -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    tok.chat_template = NATIVE_TEMPLATE
    return tok


def _history(system: bool = True) -> list[dict[str, Any]]:
    head = [{"role": "system", "content": "You are a coding agent."}] if system else []
    return [*head, {"role": "user", "content": "run the unit tests"}, copy.deepcopy(CALL_REPLY)]


def _result(shape: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": "call_1", "content": copy.deepcopy(RESULT_TEXTS[shape])}


# ---- tools in the prompt ---------------------------------------------------------------------


def test_default_template_ignores_tools_so_they_go_in_the_system_message(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    assert not template_knows_tools(tokenizer.chat_template)
    text = render_chat(tokenizer, [{"role": "system", "content": "You are a coding agent."}], tools=TOOLS)
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nYou are a coding agent.\n\n# Tools")
    for tool in TOOLS:
        fn = tool["function"]
        assert f'"name": "{fn["name"]}"' in system
        assert json.dumps(fn["parameters"]) in system
        assert json.dumps(fn["description"]) in system
    listed = re.search(r"<tools>\n(.*)\n</tools>", system, re.DOTALL)
    assert listed is not None and json.loads(listed.group(1)) == TOOLS
    assert "<tool_call>" in system and '"arguments"' in system
    assert text.count("<|im_start|>system") == 1


def test_tools_without_a_system_message_get_a_leading_one(tokenizer: PreTrainedTokenizerBase) -> None:
    text = render_chat(tokenizer, [{"role": "user", "content": "hi"}], tools=[RUN_TESTS])
    assert text.startswith("<|im_start|>system\n# Tools")
    assert "SmolLM" not in text  # the template's default system prompt gave way to ours
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert encode_chat(tokenizer, [{"role": "user", "content": "hi"}], tools=[RUN_TESTS]) == tokenizer.encode(
        text, add_special_tokens=False
    )


def test_no_tools_renders_as_the_template_does(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    plain = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert render_chat(tokenizer, messages) == plain
    assert render_chat(tokenizer, messages, tools=[]) == plain


@pytest.mark.parametrize(
    "bad",
    [
        "run_tests",
        {"type": "function", "function": {"name": "x"}},  # one tool, not a list
        [{"name": "run_tests"}],  # not wrapped in {"type": "function", "function": ...}
        [{"type": "retrieval", "function": {"name": "x"}}],
        [{"type": "function", "function": {"name": "has space"}}],
        [{"type": "function", "function": {"name": "x" * 65}}],
        [{"type": "function", "function": {"name": ""}}],
        [{"type": "function", "function": {"name": "x", "parameters": "{}"}}],
        [{"type": "function", "function": {"name": "x", "parameters": {"default": object()}}}],
        [{"type": "function", "function": {"name": "x", "description": 3}}],
        [RUN_TESTS, RUN_TESTS],
        [print],  # callables are not schemas
    ],
)
def test_tool_schemas_refuses_what_is_not_a_function_schema(
    tokenizer: PreTrainedTokenizerBase, bad: Any
) -> None:
    with pytest.raises(InvalidInput):
        tool_schemas(bad)
    with pytest.raises(InvalidInput):
        render_chat(tokenizer, [{"role": "user", "content": "hi"}], tools=bad)


def test_tool_schemas_returns_plain_copies() -> None:
    assert tool_schemas(None) == []
    out = tool_schemas((RUN_TESTS, {"type": "function", "function": {"name": "no-args_1"}}))
    assert out == [RUN_TESTS, {"type": "function", "function": {"name": "no-args_1"}}]
    out[0]["function"]["parameters"]["required"].append("verbose")
    assert RUN_TESTS["function"]["parameters"]["required"] == ["path"]


# ---- tool calls and tool results in the history ------------------------------------------------


@pytest.mark.parametrize("shape", sorted(RESULT_TEXTS))
def test_history_with_a_tool_call_and_its_result_renders(
    tokenizer: PreTrainedTokenizerBase, shape: str
) -> None:
    messages = [*_history(), _result(shape)]
    before = copy.deepcopy(messages)
    text = render_chat(tokenizer, messages, tools=TOOLS)
    assert messages == before  # the caller's messages are the history: never changed
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "run_tests", "arguments": {"path": "tests/unit"}}\n'
        "</tool_call><|im_end|>\n"
    ) in text
    result = "3 failed, 12 passed" if shape == "string" else "3 failed,\n12 passed"
    assert f"<|im_start|>user\n<tool_response>\n{result}\n</tool_response><|im_end|>\n" in text
    assert "<|im_start|>tool" not in text  # SmolLM2's template knows no tool role
    assert text.endswith("<|im_start|>assistant\n")


def test_a_reply_with_text_and_several_calls_renders_both(tokenizer: PreTrainedTokenizerBase) -> None:
    reply = {
        "role": "assistant",
        "content": [{"type": "text", "text": "Checking."}],
        "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "read_file", "arguments": {"file": "x"}}},
            {"id": "b", "type": "function", "function": {"name": "run_tests", "arguments": "not json"}},
        ],
    }
    text = render_chat(tokenizer, [{"role": "user", "content": "go"}, reply])
    assert (
        "<|im_start|>assistant\nChecking.\n"
        + tool_call_text("read_file", {"file": "x"})
        + "\n"
        + tool_call_text("run_tests", "not json")
        + "<|im_end|>"
    ) in text


@pytest.mark.parametrize(
    "message",
    [
        {"role": "tool", "tool_call_id": "c", "content": [{"type": "image_url", "image_url": "x"}]},
        {"role": "tool", "tool_call_id": "c", "content": [{"type": "text"}]},
        {"role": "user", "content": 3},
        {"role": "assistant", "tool_calls": [{"id": "c", "type": "function"}]},
        {"role": "assistant", "tool_calls": "run_tests()"},
    ],
)
def test_malformed_messages_are_invalid_input(tokenizer: PreTrainedTokenizerBase, message: Any) -> None:
    with pytest.raises(InvalidInput):
        render_chat(tokenizer, [{"role": "user", "content": "go"}, message])


@pytest.mark.parametrize("tools", [None, TOOLS])
@pytest.mark.parametrize("shape", sorted(RESULT_TEXTS))
@pytest.mark.parametrize("system", [True, False])
def test_continuation_after_a_tool_call_is_the_tail_of_the_full_render(
    tokenizer: PreTrainedTokenizerBase, tools: Any, shape: str, system: bool
) -> None:
    """What the session holds (the prompt it sent, then the reply) plus the continuation's text is
    the full render of the conversation: nothing before the reply changed."""
    history, new = _history(system), [_result(shape), {"role": "user", "content": "fix them"}]
    source = tokenizer.get_chat_template()
    prompt = render_chat(tokenizer, history[:-1], True, tools)
    reply = normalize_messages(history[-1:], source)[0]["content"]
    tail = continuation_text(tokenizer, history, new, tools)
    assert prompt + reply + tail == render_chat(tokenizer, [*history, *new], True, tools)
    assert tail.startswith("<|im_end|>\n<|im_start|>user\n<tool_response>\n")
    assert "run_tests" not in tail and "# Tools" not in tail
    tail_ids = tokenizer.encode(tail, add_special_tokens=False)
    assert continuation_ids(tokenizer, history, new, False, tools) == tail_ids
    assert tail_ids[0] == tokenizer.eos_token_id
    assert continuation_ids(tokenizer, history, new, True, tools) == tail_ids[1:]


def test_continuation_needs_the_reply_last(tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(InvalidInput):
        continuation_ids(tokenizer, [{"role": "user", "content": "hi"}], [_result("string")], False, TOOLS)


def test_a_template_that_knows_tools_renders_them_itself(native_tokenizer: PreTrainedTokenizerBase) -> None:
    assert template_knows_tools(NATIVE_TEMPLATE)
    messages = [*_history(), _result("parts")]
    text = render_chat(native_tokenizer, messages, tools=[RUN_TESTS])
    assert text.startswith("<|im_start|>system\nTOOLS:" + json.dumps(RUN_TESTS))
    assert "# Tools" not in text and "<tool_call>" not in text
    assert 'CALL run_tests {"path": "tests/unit"}' in text  # arguments handed over as a dict
    assert "<|im_start|>tool\n3 failed,\n12 passed<|im_end|>" in text
    history, new = _history(), [_result("string")]
    tail = continuation_text(native_tokenizer, history, new, [RUN_TESTS])
    assert tail == "<|im_end|>\n<|im_start|>tool\n3 failed, 12 passed<|im_end|>\n<|im_start|>assistant\n"


# ---- tool calls parsed out of a reply --------------------------------------------------------

CALL_ID = re.compile(r"call_[0-9a-f]{12}")


def _fns(calls: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    for c in calls:
        assert c["type"] == "function" and CALL_ID.fullmatch(c["id"]) and set(c) == {"id", "type", "function"}
        assert isinstance(c["function"]["arguments"], str)
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_parse_one_hermes_call() -> None:
    text, calls = parse_tool_calls('<tool_call>{"name": "run_tests", "arguments": {"path": "t"}}</tool_call>')
    assert text == "" and _fns(calls) == [("run_tests", {"path": "t"})]


def test_parse_several_hermes_calls_with_text_and_whitespace() -> None:
    reply = (
        'Let me look.\n<tool_call>\n  {\n "name": "read_file",\n "arguments": {"file": "a.py"}}\n'
        '\n</tool_call>\n\n<tool_call>{"name":"run_tests","arguments":"{\\"path\\": \\"t\\"}"}</tool_call>\n'
    )
    text, calls = parse_tool_calls(reply)
    assert text == "Let me look."
    assert _fns(calls) == [("read_file", {"file": "a.py"}), ("run_tests", {"path": "t"})]
    assert calls[0]["id"] != calls[1]["id"]


def test_parse_what_the_fallback_prompt_shows() -> None:
    args = {"path": "tests", "verbose": True, "n": [1, 2], "note": "ünïcode"}
    assert _fns(parse_tool_calls(tool_call_text("run_tests", args))[1]) == [("run_tests", args)]


def test_parse_a_call_without_arguments() -> None:
    assert _fns(parse_tool_calls('<tool_call>{"name": "ping"}</tool_call>')[1]) == [("ping", {})]


@pytest.mark.parametrize(
    "reply",
    [
        '{"name": "run_tests", "parameters": {"path": "t"}}',
        '  <|python_tag|>{"name": "run_tests", "parameters": {"path": "t"}}\n',
        '{"type": "function", "name": "run_tests", "arguments": {"path": "t"}}',
        '{"name": "run_tests", "arguments": "{\\"path\\": \\"t\\"}"}',
    ],
)
def test_parse_the_llama_json_form(reply: str) -> None:
    text, calls = parse_tool_calls(reply)
    assert text == "" and _fns(calls) == [("run_tests", {"path": "t"})]


@pytest.mark.parametrize(
    "reply",
    [
        "All 12 tests pass.",
        "",
        '<tool_call>{"name": "run_tests", "arguments": {"path": </tool_call>',  # broken JSON
        '<tool_call>{"name": "run_tests", "arguments": {"path": "t"}}',  # never closed
        '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b"',  # second unclosed
        '<tool_call>{"name": "ok", "arguments": {}}</tool_call><tool_call>[1]</tool_call>',  # one bad
        '<tool_call>{"name": "has space", "arguments": {}}</tool_call>',
        '<tool_call>{"name": "x", "arguments": [1, 2]}</tool_call>',
        '<tool_call>{"name": "x", "arguments": {}, "parameters": {}}</tool_call>',
        '{"name": "Bob", "age": 3}',  # a JSON answer, not a call
        '{"name": "run_tests"}',
        '{"name": "run_tests", "parameters": {"path": "t"}} and then some',
        'Call it like {"name": "run_tests", "parameters": {}}',
        '<|python_tag|>brave_search.call(query="x")',
        '[{"name": "run_tests", "parameters": {}}]',
    ],
)
def test_plain_or_malformed_replies_have_no_calls(reply: str) -> None:
    assert parse_tool_calls(reply) == (reply, [])


# ---- stop strings ------------------------------------------------------------------------------


def _reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text cut where the first stop string to complete begins (the longer one on a tie)."""
    ends = [(i + len(s), -len(s)) for s in stops if (i := text.find(s)) >= 0]
    if not ends:
        return text, False
    end, minus_len = min(ends)
    return text[: end + minus_len], True


def _stream(stops: StopStrings, chunks: list[str]) -> tuple[str, bool]:
    out, stopped = [], False
    for chunk in chunks:
        safe, stopped = stops.feed(chunk)
        out.append(safe)
        if stopped:
            break
    if not stopped:
        out.append(stops.flush())
    return "".join(out), stopped


@settings(max_examples=400, deadline=None)
@given(
    text=st.text(alphabet="abc", max_size=40),
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=5), max_size=4),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=12),
)
def test_stop_strings_are_stream_safe_over_any_chunking(text: str, stops: list[str], cuts: list[int]) -> None:
    bounds = [0, *sorted(c for c in cuts if c <= len(text)), len(text)]
    chunks = [text[a:b] for a, b in itertools.pairwise(bounds)]
    assert _stream(StopStrings(stops), chunks) == _reference(text, stops)


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet="ab</>x", max_size=30), cuts=st.lists(st.integers(0, 30), max_size=8))
def test_emitted_text_never_holds_a_stop_prefix_that_later_completes(text: str, cuts: list[int]) -> None:
    """Whatever is emitted before the stop is final: it is a prefix of the cut text."""
    stops = StopStrings(["</x>", "<a"])
    bounds = [0, *sorted(c for c in cuts if c <= len(text)), len(text)]
    emitted = ""
    expected, _ = _reference(text, ["</x>", "<a"])
    for a, b in itertools.pairwise(bounds):
        safe, stopped = stops.feed(text[a:b])
        emitted += safe
        assert expected.startswith(emitted)
        if stopped:
            break


def test_stop_strings_hold_back_a_possible_start() -> None:
    stops = StopStrings(["User:", "\n\n"])
    assert stops.feed("Hello Us") == ("Hello ", False)
    assert stops.feed("e") == ("", False)
    assert stops.feed("d to it\n") == ("Used to it", False)
    assert stops.feed("\nUser: more") == ("", True)  # "\n\n" completed first
    assert stops.feed("ignored") == ("", True)
    assert stops.flush() == ""


def test_stop_strings_flush_what_never_completed() -> None:
    stops = StopStrings("</end>")
    assert stops.feed("done </en") == ("done ", False)
    assert stops.flush() == "</en"
    assert StopStrings(None).feed("any text") == ("any text", False)


@pytest.mark.parametrize("bad", [[""], ["x"] * 9, ["x" * 257], [3], "", 3, {"a"}])
def test_stop_strings_are_validated(bad: Any) -> None:
    with pytest.raises(InvalidInput):
        StopStrings(bad)
    StopStrings(["x"] * 8)
    StopStrings(["x" * 256])
