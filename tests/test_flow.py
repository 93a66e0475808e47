"""The I/O-free step flow, driven by hand: every effect it asks for and what it makes of the replies."""

from __future__ import annotations

from typing import Any

from dualpath_sdk.api.flow import Commit, Emit, Lookup, ModelFacts, Receive, Stop, Submit, prepare, step_flow
from dualpath_sdk.api.inputs import StepOptions
from dualpath_sdk.cluster.controller import StepOutcome
from dualpath_sdk.store.manifest import SessionManifest

TEXT = {
    1: "Let me run them. ",
    2: '<tool_call>{"name": "run_tests", ',
    3: '"arguments": {"path": "."}}',
    4: "</tool_call>",
}


class CharTokenizer:
    """Stand-in tokenizer for this unit test of the flow: token i decodes to TEXT[i]."""

    eos_token_id = 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(TEXT[i] for i in ids)


def _facts() -> ModelFacts:
    return ModelFacts(CharTokenizer(), 10, 1000, 4, "dualpath", "auto", lambda tenant: b"\0" * 16)  # type: ignore[arg-type]


def _outcome(reason: str) -> StepOutcome:
    return StepOutcome(reason, "none", 0, 0, 0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0)


def _drive(
    tools: list[dict[str, Any]] | None, stop: list[str] | None, events: list[Any]
) -> tuple[Any, list[Any]]:
    manifest = SessionManifest(session_id="s", token_ids=[5, 6], messages=[])
    step = prepare(_facts(), manifest, [7], None, StepOptions(stop=stop))
    step = type(step)(
        step.prompt, [{"role": "user", "content": "go"}], step.params, step.plan, tools or [], step.stop
    )
    flow = step_flow(_facts(), manifest, step)
    effects, reply, queue = [], None, list(events)
    while True:
        try:
            effect = flow.send(reply)
        except StopIteration as done:
            return done.value, effects
        effects.append(effect)
        reply = None
        if isinstance(effect, Lookup):
            reply = ([], 0)
        elif isinstance(effect, Receive):
            reply = queue.pop(0)
        elif isinstance(effect, Commit):
            reply = effect.manifest


def test_a_reply_with_a_tool_call_becomes_tool_calls() -> None:
    tools = [{"type": "function", "function": {"name": "run_tests"}}]
    result, effects = _drive(tools, None, [[1], [2], [3], [4], _outcome("stop")])
    assert [type(e) for e in effects[:2]] == [Lookup, Submit]
    assert effects[1].request.token_ids == [5, 6, 7]
    assert "".join(e.chunk.text for e in effects if isinstance(e, Emit)) == "".join(TEXT.values())
    assert result.finish_reason == "tool_calls" and result.text == "Let me run them."
    (call,) = result.tool_calls
    assert call["function"] == {"name": "run_tests", "arguments": '{"path": "."}'}
    (commit,) = [e for e in effects if isinstance(e, Commit)]
    assert commit.manifest.messages[-1] == {
        "role": "assistant",
        "content": "Let me run them.",
        "tool_calls": [call],
    }
    assert commit.manifest.token_ids == [5, 6, 7, 1, 2, 3, 4] and commit.manifest.tools == tools


def test_without_tools_the_markup_stays_text_and_a_length_cut_is_no_call() -> None:
    result, _ = _drive(None, None, [[1], [2], [3], [4], _outcome("stop")])
    assert result.finish_reason == "stop" and result.tool_calls == [] and "<tool_call>" in result.text
    tools = [{"type": "function", "function": {"name": "run_tests"}}]
    cut, _ = _drive(tools, None, [[1], [2], [3], [4], _outcome("length")])
    assert cut.finish_reason == "length"


def test_a_stop_string_asks_to_stop_and_drops_what_follows() -> None:
    result, effects = _drive(None, ["run them"], [[1], [2], _outcome("stop")])
    assert Stop() in effects
    assert result.text == "Let me " and result.token_ids == [1]  # token 2 came after the stop
    (commit,) = [e for e in effects if isinstance(e, Commit)]
    assert commit.manifest.token_ids == [5, 6, 7, 1]
