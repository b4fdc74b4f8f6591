// The JS client libraries' typed calls against mlxd:
//   node clients.mjs URL MODEL TOOL_MODEL
// prints one JSON object, each call's answer under its name; TOOL_MODEL answers
// with a call of a tool named Read (tests/e2e_python/test_js_clients.py checks them).
import Anthropic from "@anthropic-ai/sdk";
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { generateText, jsonSchema, streamText, tool } from "ai";
import { Ollama } from "ollama";
import OpenAI from "openai";

const [url, model, toolModel] = process.argv.slice(2);
const question = "What is two plus two?";
const messages = [{ role: "user", content: question }];
const out = {};

const openai = new OpenAI({ baseURL: `${url}/v1`, apiKey: "unused", maxRetries: 0 });
out.openai_chat = (await openai.chat.completions.create({ model, messages, max_tokens: 12 })).choices[0].message.content;
let streamed = "";
for await (const chunk of await openai.chat.completions.create({ model, messages, max_tokens: 12, stream: true })) {
  streamed += chunk.choices[0]?.delta?.content ?? "";
}
out.openai_chat_stream = streamed;
out.openai_responses = (await openai.responses.create({ model, input: question, max_output_tokens: 12 })).output_text;

const anthropic = new Anthropic({ baseURL: url, apiKey: "unused", maxRetries: 0 });
const message = await anthropic.messages.create({ model, messages, max_tokens: 12 });
out.anthropic_messages = message.content.map((b) => b.text ?? "").join("");
out.anthropic_stream = (await anthropic.messages.stream({ model, messages, max_tokens: 12 }).finalText());

const ollama = new Ollama({ host: url });
out.ollama_chat = (await ollama.chat({ model, messages, options: { num_predict: 12 } })).message.content;

const mlxd = createOpenAICompatible({ name: "mlxd", baseURL: `${url}/v1`, apiKey: "unused" });
out.ai_sdk_generate = (await generateText({ model: mlxd(model), prompt: question, maxOutputTokens: 12 })).text;
const s = streamText({ model: mlxd(model), prompt: question, maxOutputTokens: 12 });
out.ai_sdk_stream = await s.text;

// Tool calls, parsed by each library into its own types.
const readSchema = { type: "object", properties: { file_path: { type: "string" } }, required: ["file_path"] };
const called = await openai.chat.completions.create({
  model: toolModel,
  messages: [{ role: "user", content: "Read my notes." }],
  tools: [{ type: "function", function: { name: "Read", parameters: readSchema } }],
  max_tokens: 64,
});
out.openai_tool_call = called.choices[0].message.tool_calls.map((c) => [c.function.name, JSON.parse(c.function.arguments)]);
const withTool = await generateText({
  model: mlxd(toolModel),
  prompt: "Read my notes.",
  tools: { Read: tool({ description: "Read a file", inputSchema: jsonSchema(readSchema) }) },
  maxOutputTokens: 64,
});
out.ai_sdk_tool_call = withTool.toolCalls.map((c) => [c.toolName, c.input]);

console.log(JSON.stringify(out));
