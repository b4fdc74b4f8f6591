"""Claude Code and Codex CLI, installed from npm, complete an agent turn against mlxd.

Each CLI runs non-interactively with its default settings and tools; only where
the server is, a token, the model's name and what turns off telemetry and updates
are set. The model (agent_model.py) answers the CLI's real first request (~12k
tokens of system prompt and tools for Claude Code, ~9k for Codex) with a call of
the CLI's own tool, which the CLI runs; the CLI sends the tool's result back, and
the model's answer ends the turn. So the test sees what a user sees: the tool ran
on mlxd's call, its output went back, the answer arrived, the CLI exited 0, and
the follow-up request came mostly from the prompt cache.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from agent_model import ANSWER, CLAUDE_CODE_CALL, CODEX_CALL, NOTES, ROOT, WORK_DIR

CLIS = ROOT / "target" / "node" / "node_modules" / ".bin"
NOTES_TEXT = "mlxd notes: the kettle is in the second cupboard"
# What each CLI may take at most for its two requests (the model is tiny).
TIMEOUT = 240
QUIET = {
    "DISABLE_TELEMETRY": "1",
    "DISABLE_ERROR_REPORTING": "1",
    "DISABLE_AUTOUPDATER": "1",
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "NO_COLOR": "1",
}


def cli(name: str) -> Path:
    path = CLIS / name
    assert path.exists(), f"{path} is missing: scripts/test installs the agent CLIs (tests/node)"
    return path


@pytest.fixture(scope="module")
def work_dir() -> Path:
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    (WORK_DIR / NOTES).write_text(NOTES_TEXT + "\n")
    return WORK_DIR


def run(argv: list[str], cwd: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    """Runs a CLI to the end; its JSON-lines events."""
    done = subprocess.run(
        argv,
        cwd=cwd,
        env={"PATH": os.environ["PATH"], **QUIET, **env},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, f"{argv[0]} exited {done.returncode}: {done.stderr[-3000:]}\n{done.stdout[-3000:]}"
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def blocks(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The content blocks of Claude Code's `kind` ("assistant"/"user") messages."""
    return [b for e in events if e.get("type") == kind for b in e["message"]["content"] if isinstance(b, dict)]


def test_claude_code_runs_a_tool_turn(daemon_url: str, work_dir: Path, tmp_path: Path) -> None:
    events = run(
        [str(cli("claude")), "-p", f"What do my notes in {NOTES} say?", "--output-format", "stream-json", "--verbose"],
        cwd=work_dir,
        env={
            "HOME": str(tmp_path),
            "ANTHROPIC_BASE_URL": daemon_url,
            "ANTHROPIC_AUTH_TOKEN": "unused",
            "ANTHROPIC_MODEL": "agent-claude-code",
            "ANTHROPIC_SMALL_FAST_MODEL": "agent-claude-code",
        },
    )
    # Each turn's usage as message_start gave it: the whole prompt, before its answer.
    for e in events:
        if e.get("type") == "assistant":
            u = e["message"]["usage"]
            assert u["input_tokens"] + u.get("cache_read_input_tokens", 0) > 5000, u
    tool, arguments = CLAUDE_CODE_CALL
    calls = [b for b in blocks(events, "assistant") if b["type"] == "tool_use"]
    assert [(c["name"], c["input"]) for c in calls] == [(tool, arguments)]
    # Claude Code ran the call mlxd returned and sent its output back.
    results = [b for b in blocks(events, "user") if b["type"] == "tool_result"]
    assert len(results) == 1 and results[0]["tool_use_id"] == calls[0]["id"]
    assert NOTES_TEXT in json.dumps(results[0]["content"])
    result = events[-1]
    assert result["type"] == "result" and result["subtype"] == "success", result
    assert result["result"] == ANSWER and result["num_turns"] == 2
    # The follow-up request (the first one, plus the call and its result) came
    # from the prompt cache but for what was new. Anthropic counts cached tokens
    # apart from input_tokens; Claude Code adds both turns up.
    usage = result["usage"]
    assert usage["cache_read_input_tokens"] >= 0.95 * usage["input_tokens"] > 0, usage


def test_codex_exec_runs_a_tool_turn(daemon_url: str, work_dir: Path, tmp_path: Path) -> None:
    codex_home = tmp_path / "codex"
    codex_home.mkdir()
    (codex_home / "config.toml").write_text(
        'model = "agent-codex"\nmodel_provider = "mlxd"\n\n'
        f'[model_providers.mlxd]\nname = "mlxd"\nbase_url = "{daemon_url}/v1"\nwire_api = "responses"\n'
        'env_key = "MLXD_KEY"\nrequest_max_retries = 0\nstream_max_retries = 0\n'
    )
    events = run(
        [str(cli("codex")), "exec", "--json", "--skip-git-repo-check", f"Show me {NOTES}"],
        cwd=work_dir,
        env={"HOME": str(tmp_path), "CODEX_HOME": str(codex_home), "MLXD_KEY": "unused"},
    )
    items = [e["item"] for e in events if e.get("type") == "item.completed"]
    commands = [i for i in items if i["type"] == "command_execution"]
    _, arguments = CODEX_CALL
    assert len(commands) == 1 and str(arguments["cmd"]) in commands[0]["command"], items
    assert commands[0]["exit_code"] == 0 and NOTES_TEXT in commands[0]["aggregated_output"]
    assert [i["text"] for i in items if i["type"] == "agent_message"] == [ANSWER]
    turns = [e for e in events if e.get("type") in ("turn.completed", "turn.failed")]
    assert [t["type"] for t in turns] == ["turn.completed"], turns
    # OpenAI counts cached tokens inside input_tokens; Codex adds both requests up.
    usage = turns[0]["usage"]
    assert usage["cached_input_tokens"] >= 0.95 * (usage["input_tokens"] - usage["cached_input_tokens"]) > 0, usage
