// The Vercel AI SDK (ai + @ai-sdk/openai-compatible) against the server's /v1, as the Fictures
// web app calls it: generateObject with a Zod schema (json_schema sent), generateText,
// streamText, and tool calls (streamText with toolChoice "required", generateText with a named
// tool). Prints one JSON object with what each returned; tests/e2e/test_vercel_ai_sdk.py
// checks it. Usage: node vercel_ai_sdk.mjs BASE_URL API_KEY MODEL
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { generateObject, generateText, streamText, tool } from "ai";
import { z } from "zod";

globalThis.AI_SDK_LOG_WARNINGS = false;
const [baseURL, apiKey, model] = process.argv.slice(2);
const provider = createOpenAICompatible({
  name: "fictures",
  baseURL,
  apiKey,
  supportsStructuredOutputs: true,
});

const objects = [];
for (let seed = 0; seed < 3; seed++) {
  const { object, finishReason, usage } = await generateObject({
    model: provider(model),
    schema: z.object({ name: z.string(), age: z.number().int() }),
    prompt: "Invent a character for a story.",
    maxOutputTokens: 200,
    seed,
  });
  objects.push({ object, finishReason, outputTokens: usage.outputTokens });
}
const text = await generateText({ model: provider(model), prompt: "Say hello.", maxOutputTokens: 8 });
let streamed = "";
const stream = streamText({ model: provider(model), prompt: "Count to three.", maxOutputTokens: 12 });
for await (const part of stream.textStream) streamed += part;

// Tools without execute: the SDK returns the calls for the app to run.
const tools = {
  get_weather: tool({
    description: "The weather in a city.",
    inputSchema: z.object({ city: z.string() }),
  }),
  get_time: tool({ description: "The time now.", inputSchema: z.object({}) }),
};
const toolStream = streamText({
  model: provider(model),
  prompt: "What is the weather in Paris?",
  tools,
  toolChoice: "required",
  temperature: 0,
  maxOutputTokens: 80,
});
const streamedToolCalls = (await toolStream.toolCalls).map((c) => ({
  toolName: c.toolName,
  input: c.input,
}));
const streamedToolFinish = await toolStream.finishReason;
const named = await generateText({
  model: provider(model),
  prompt: "What is the weather in Paris?",
  tools,
  toolChoice: { type: "tool", toolName: "get_weather" },
  temperature: 0,
  maxOutputTokens: 80,
});
const namedToolCalls = named.toolCalls.map((c) => ({ toolName: c.toolName, input: c.input }));
console.log(
  JSON.stringify({
    objects,
    text: text.text,
    streamed,
    streamedToolCalls,
    streamedToolFinish,
    namedToolCalls,
    namedFinish: named.finishReason,
  }),
);
