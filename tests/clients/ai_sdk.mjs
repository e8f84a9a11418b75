// The Vercel AI SDK (`ai` + `@ai-sdk/openai-compatible`) against mlx-supervisor: generateText and
// streamText with a forced tool, generateObject and streamObject with a zod schema, several at
// once. Prints one JSON line of results for pytest to validate against schemas.json.
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { generateObject, generateText, jsonSchema, streamObject, streamText, tool } from "ai";
import { readFileSync } from "node:fs";
import { z } from "zod";

const { weather } = JSON.parse(readFileSync(new URL("./schemas.json", import.meta.url)));
const provider = createOpenAICompatible({ name: "mlx", baseURL: process.argv[2], apiKey: "x",
  supportsStructuredOutputs: true });
const model = provider("tools");
const common = { model, prompt: "Weather in Paris?", temperature: 0, maxOutputTokens: 120,
  maxRetries: 0 };
// The random test model would go on calling: one call per turn, as OpenAI's parallel_tool_calls.
const forced = { ...common, tools: { get_weather: tool({ description: "Weather in a city",
  inputSchema: jsonSchema(weather) }) }, toolChoice: { type: "tool", toolName: "get_weather" },
  providerOptions: { mlx: { parallel_tool_calls: false } } };
const Answer = z.object({ ok: z.boolean(), n: z.number().int().min(10).max(20) });

async function call(stream) {
  const r = stream ? streamText(forced) : await generateText(forced);
  const calls = await r.toolCalls;
  return { finish: await r.finishReason, text: await r.text,
    calls: calls.map((c) => ({ id: c.toolCallId, name: c.toolName, arguments: c.input })) };
}

async function object(stream) {
  const opts = { ...common, schema: Answer, schemaName: "answer" };
  if (!stream) {
    const r = await generateObject(opts);
    return { finish: r.finishReason, object: r.object };
  }
  const r = streamObject(opts);
  const partials = [];
  for await (const p of r.partialObjectStream) partials.push(p);
  return { finish: await r.finishReason, object: await r.object, partials: partials.length };
}

const jobs = [];
for (const stream of [false, true]) {
  for (let i = 0; i < 2; i++) {
    jobs.push(call(stream).then((r) => ({ kind: "call", stream, ...r })));
    jobs.push(object(stream).then((r) => ({ kind: "object", stream, ...r })));
  }
}
console.log(JSON.stringify(await Promise.all(jobs)));
