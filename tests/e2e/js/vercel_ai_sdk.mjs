// The Vercel AI SDK (ai + @ai-sdk/openai-compatible) against the server's /v1, as the Fictures
// web app calls it: generateObject with a Zod schema (json_schema sent), generateText,
// streamText. Prints one JSON object with what each returned; tests/e2e/test_vercel_ai_sdk.py
// checks it. Usage: node vercel_ai_sdk.mjs BASE_URL API_KEY MODEL
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { generateObject, generateText, streamText } from "ai";
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
console.log(JSON.stringify({ objects, text: text.text, streamed }));
