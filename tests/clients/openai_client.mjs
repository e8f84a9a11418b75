// The npm `openai` package against mlx-supervisor: forced tool calls and json_schema objects,
// plain and streamed, several at once. Prints one JSON line of results for pytest to validate.
import { readFileSync } from "node:fs";
import OpenAI from "openai";

const { weather, answer } = JSON.parse(readFileSync(new URL("./schemas.json", import.meta.url)));
const client = new OpenAI({ baseURL: process.argv[2], apiKey: "x", maxRetries: 0 });
const base = { model: "tools", messages: [{ role: "user", content: "Weather in Paris?" }],
  temperature: 0, max_tokens: 120 };
const tools = [{ type: "function", function: { name: "get_weather", parameters: weather } }];
const forced = { ...base, tools, parallel_tool_calls: false,
  tool_choice: { type: "function", function: { name: "get_weather" } } };
const format = { ...base, response_format: { type: "json_schema",
  json_schema: { name: "answer", schema: answer, strict: true } } };

async function call(stream) {
  if (!stream) {
    const r = await client.chat.completions.create(forced);
    const c = r.choices[0];
    return { finish: c.finish_reason, content: c.message.content,
      calls: c.message.tool_calls.map((t) => ({ id: t.id, name: t.function.name,
        arguments: t.function.arguments })) };
  }
  const s = client.chat.completions.stream({ ...forced, stream: true });
  let content = "";
  s.on("content", (d) => { content += d; });
  const done = await s.finalChatCompletion();
  const c = done.choices[0];
  return { finish: c.finish_reason, content: content || null,
    calls: c.message.tool_calls.map((t) => ({ id: t.id, name: t.function.name,
      arguments: t.function.arguments })) };
}

async function object(stream) {
  if (!stream) {
    const r = await client.chat.completions.create(format);
    return { finish: r.choices[0].finish_reason, text: r.choices[0].message.content };
  }
  const s = await client.chat.completions.create({ ...format, stream: true });
  let text = "", finish = null;
  for await (const chunk of s) {
    const c = chunk.choices[0];
    if (!c) continue;
    text += c.delta.content ?? "";
    finish = c.finish_reason ?? finish;
  }
  return { finish, text };
}

const jobs = [];
for (const stream of [false, true]) {
  for (let i = 0; i < 2; i++) {
    jobs.push(call(stream).then((r) => ({ kind: "call", stream, ...r })));
    jobs.push(object(stream).then((r) => ({ kind: "object", stream, ...r })));
  }
}
console.log(JSON.stringify(await Promise.all(jobs)));
