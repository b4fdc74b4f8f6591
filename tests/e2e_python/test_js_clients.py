"""The JS client libraries make their typed calls against mlxd: the npm `openai`,
`@anthropic-ai/sdk` and `ollama` packages and the Vercel AI SDK
(`@ai-sdk/openai-compatible`), at the versions tests/node pins, run by node
(tests/node/clients.mjs). Each answer is a scripted model's known text; the tool
calls are the scripted tool model's one call, parsed into each library's types.
"""

from __future__ import annotations

import json
import shutil
import subprocess

from agent_model import CLAUDE_CODE_CALL, ROOT
from scripted import PLAIN_ANSWER

NODE_DIR = ROOT / "target" / "node"
TEXT_CALLS = [
    "openai_chat",
    "openai_chat_stream",
    "openai_responses",
    "anthropic_messages",
    "anthropic_stream",
    "ollama_chat",
    "ai_sdk_generate",
    "ai_sdk_stream",
]


def test_js_clients_typed_calls_get_their_answers(daemon_url: str) -> None:
    assert (NODE_DIR / "node_modules" / "openai").is_dir(), "scripts/test installs the JS clients (tests/node)"
    # Run from where its packages are installed.
    script = NODE_DIR / "clients.mjs"
    shutil.copyfile(ROOT / "tests" / "node" / "clients.mjs", script)
    done = subprocess.run(
        ["node", str(script), daemon_url, "scripted-plain", "agent-claude-code"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert {name: out.get(name) for name in TEXT_CALLS} == dict.fromkeys(TEXT_CALLS, PLAIN_ANSWER)
    tool, arguments = CLAUDE_CODE_CALL
    assert out["openai_tool_call"] == [[tool, arguments]]
    assert out["ai_sdk_tool_call"] == [[tool, arguments]]
