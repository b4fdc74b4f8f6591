"""Planning a request's prompt: stacked and mid-conversation system messages for
templates that take one system message, first."""

from __future__ import annotations

from typing import Any

from mlxd_worker.requests.plan import _system_turns_as_user


def test_a_system_message_mid_conversation_becomes_a_user_turn_merged_with_its_neighbour() -> None:
    messages: list[Any] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "system", "content": "The user is in Paris."},
        {"role": "user", "content": "Weather?"},
    ]
    assert _system_turns_as_user(messages) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "System: The user is in Paris.\n\nWeather?"},
    ]
    # A leading system message is where every template wants it: nothing to move.
    assert _system_turns_as_user(messages[:3]) is None
    # Stacked leading ones (Anthropic's `system` and a first system message) join.
    stacked: list[Any] = [{"role": "system", "content": "Be brief."}, *messages[3:]]
    assert _system_turns_as_user(stacked) == [
        {"role": "system", "content": "Be brief.\n\nThe user is in Paris."},
        {"role": "user", "content": "Weather?"},
    ]
    # A user turn carrying more than text (a tool result's id) is not merged into.
    tool_turn: list[Any] = [
        {"role": "user", "content": "Hi"},
        {"role": "system", "content": "Note."},
        {"role": "tool", "content": "18C", "tool_call_id": "c1"},
    ]
    assert _system_turns_as_user(tool_turn) == [
        {"role": "user", "content": "Hi\n\nSystem: Note."},
        {"role": "tool", "content": "18C", "tool_call_id": "c1"},
    ]
