// The playground: streams text and images from this server's Fictures API.
// Plain modern JavaScript, no build step. Server data is only ever inserted with textContent.

const API_KEY_STORAGE = "fictures-ai.playground.api-key";

const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------------------------------------
// Requests

/** Request headers: JSON, plus the API key as a bearer token when one is typed in. */
function requestHeaders() {
  const headers = { Accept: "application/json, text/event-stream" };
  const key = $("api-key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

/** A number input's value, or undefined when empty (the server then uses its default). */
function numberOf(input) {
  const raw = input.value.trim();
  return raw === "" ? undefined : Number(raw);
}

/** The `detail` of an error body as one line: a string, or FastAPI's list of field errors. */
function describeDetail(detail) {
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail
      .map((item) => {
        const where = (item.loc ?? []).filter((part) => part !== "body").join(".");
        return where ? `${where}: ${item.msg}` : String(item.msg);
      })
      .join("; ");
  }
  return detail === undefined ? "" : JSON.stringify(detail);
}

/** The message of an HTTP error response (`{"detail": ...}` on this API). */
async function httpErrorMessage(response) {
  let detail = "";
  try {
    detail = describeDetail((await response.json()).detail);
  } catch {
    // Not JSON (a proxy's error page, say): the status line has to do.
  }
  return `HTTP ${response.status}: ${detail || response.statusText || "request failed"}`;
}

/** POST a JSON body and answer the response; throws an Error with the server's message. */
async function postJson(path, body, signal) {
  const response = await fetch(path, {
    method: "POST",
    headers: { ...requestHeaders(), "Content-Type": "application/json" },
    body: JSON.stringify(body),
    signal,
  });
  if (!response.ok) throw new Error(await httpErrorMessage(response));
  return response;
}

/**
 * The events of a server-sent event response, parsed from JSON, until `data: [DONE]`.
 * EventSource cannot POST, so the body is read with a stream reader.
 */
async function* readEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer = (buffer + value).replace(/\r\n/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) !== -1) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (data === "") continue;
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

function isAbort(error) {
  return error instanceof DOMException && error.name === "AbortError";
}

/** Record a panel's state (idle, waiting, streaming/rendering, done, stopped, error). */
function setState(panelId, state) {
  $(panelId).dataset.state = state;
}

function showError(element, message) {
  element.textContent = message;
  element.hidden = !message;
}

// ---------------------------------------------------------------------------------------------
// Models (from /health)

async function loadModels() {
  try {
    const response = await fetch("health", { headers: requestHeaders() });
    if (!response.ok) throw new Error(await httpErrorMessage(response));
    const { models, generation_mode: mode } = await response.json();
    const state = (info) => (info.initialized ? "loaded" : "loads on first use");
    for (const kind of ["text", "image"]) {
      const info = models[kind];
      // A server started with GENERATION_MODE=text or image serves one half only.
      $(`${kind}-model`).textContent = info
        ? `${info.name} (${state(info)})`
        : `not served here (GENERATION_MODE=${mode})`;
      $(`${kind}-panel`).hidden = !info;
    }
    const notice = $("image-notice");
    notice.textContent = models.image?.notice ? `Image model: ${models.image.notice}` : "";
    notice.hidden = !models.image?.notice;
  } catch (error) {
    $("text-model").textContent = $("image-model").textContent = "unavailable";
    $("text-model").title = String(error.message ?? error);
  }
}

// ---------------------------------------------------------------------------------------------
// Text

/** "120 tokens · finish reason: length · first text after 0.3 s · 31 tokens/s". */
function describeRun(last, started, firstTextAt, ended) {
  const parts = [`${last.tokens_used} tokens`, `finish reason: ${last.finish_reason}`];
  parts.push(`first text after ${((firstTextAt - started) / 1000).toFixed(1)} s`);
  const streamingSeconds = (ended - firstTextAt) / 1000;
  if (last.tokens_used > 1 && streamingSeconds > 0) {
    parts.push(`${Math.round((last.tokens_used - 1) / streamingSeconds)} tokens/s`);
  }
  return parts.join(" · ");
}

let textRun = null; // the AbortController of the stream in flight

async function generateText(event) {
  event.preventDefault();
  if (textRun) return;
  const output = $("output");
  const status = $("text-status");
  const run = (textRun = new AbortController());
  $("generate").disabled = true;
  $("stop").disabled = false;
  showError($("text-error"), "");
  output.textContent = "";
  setState("text-panel", "waiting");
  status.textContent = "Waiting for the model (the first request loads it)…";
  const started = performance.now();
  let firstTextAt = null;
  let finished = false;
  let failed = false;
  try {
    const response = await postJson(
      "api/v1/text/stream",
      {
        prompt: $("prompt").value,
        max_tokens: numberOf($("max-tokens")),
        temperature: numberOf($("temperature")),
      },
      run.signal,
    );
    status.textContent = "Streaming…";
    setState("text-panel", "streaming");
    for await (const chunk of readEvents(response)) {
      firstTextAt ??= performance.now();
      if (typeof chunk.delta === "string") output.append(chunk.delta);
      else if (typeof chunk.text === "string") output.textContent = chunk.text;
      if (chunk.error) {
        failed = true;
        showError($("text-error"), `Generation failed: ${chunk.error}`);
      }
      if (chunk.done) {
        finished = true;
        status.textContent = describeRun(chunk, started, firstTextAt, performance.now());
      }
    }
    if (!finished) status.textContent = "The stream ended before the last event.";
    setState("text-panel", failed || !finished ? "error" : "done");
  } catch (error) {
    if (isAbort(error)) {
      status.textContent = "Stopped.";
      setState("text-panel", "stopped");
    } else {
      status.textContent = "";
      showError($("text-error"), error.message ?? String(error));
      setState("text-panel", "error");
    }
  } finally {
    textRun = null;
    $("generate").disabled = false;
    $("stop").disabled = true;
    loadModels();
  }
}

// ---------------------------------------------------------------------------------------------
// Images

let imageRun = null;

async function generateImage(event) {
  event.preventDefault();
  if (imageRun) return;
  const progress = $("image-progress");
  const info = $("image-info");
  const image = $("image");
  const run = (imageRun = new AbortController());
  $("image-generate").disabled = true;
  $("image-stop").disabled = false;
  showError($("image-error"), "");
  progress.hidden = false;
  setState("image-panel", "waiting");
  progress.removeAttribute("value"); // indeterminate until the first step
  info.textContent = "Queued (the first request builds or loads the model)…";
  const prompt = $("image-prompt").value;
  try {
    const response = await postJson(
      "api/v1/images/stream",
      {
        prompt,
        negative_prompt: $("negative-prompt").value.trim() || undefined,
        width: numberOf($("width")),
        height: numberOf($("height")),
        num_inference_steps: numberOf($("steps")),
        seed: numberOf($("seed")),
      },
      run.signal,
    );
    let state = "error"; // unless the image arrives
    for await (const result of readEvents(response)) {
      if (result.error) {
        info.textContent = "";
        showError($("image-error"), `Generation failed: ${result.error}`);
      } else if (!result.done) {
        setState("image-panel", "rendering");
        progress.max = result.total_steps;
        progress.value = result.step;
        info.textContent = `Step ${result.step} of ${result.total_steps}…`;
      } else {
        state = "done";
        progress.value = progress.max;
        image.alt = `Generated image: ${prompt}`;
        image.src = result.image_url;
        image.hidden = false;
        info.textContent =
          `seed ${result.seed} · ${result.width}×${result.height} · ${result.model}`;
      }
    }
    if (state !== "done" && $("image-error").hidden) {
      info.textContent = "The stream ended before the image.";
    }
    setState("image-panel", state);
  } catch (error) {
    if (isAbort(error)) {
      info.textContent = "Stopped.";
      setState("image-panel", "stopped");
    } else {
      info.textContent = "";
      showError($("image-error"), error.message ?? String(error));
      setState("image-panel", "error");
    }
  } finally {
    imageRun = null;
    progress.hidden = true;
    $("image-generate").disabled = false;
    $("image-stop").disabled = true;
    loadModels();
  }
}

// ---------------------------------------------------------------------------------------------
// Wiring

function restoreApiKey() {
  const input = $("api-key");
  try {
    input.value = localStorage.getItem(API_KEY_STORAGE) ?? "";
  } catch {
    // Storage can be off (private windows, policies): the key then lasts for the page only.
  }
  input.addEventListener("input", () => {
    try {
      const key = input.value.trim();
      if (key) localStorage.setItem(API_KEY_STORAGE, key);
      else localStorage.removeItem(API_KEY_STORAGE);
    } catch {
      // See above.
    }
  });
}

function submitOnCtrlEnter(textarea, form) {
  textarea.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
}

restoreApiKey();
$("api-key-form").addEventListener("submit", (event) => event.preventDefault()); // Enter
$("text-form").addEventListener("submit", generateText);
$("stop").addEventListener("click", () => textRun?.abort());
$("image-form").addEventListener("submit", generateImage);
$("image-stop").addEventListener("click", () => imageRun?.abort());
submitOnCtrlEnter($("prompt"), $("text-form"));
submitOnCtrlEnter($("image-prompt"), $("image-form"));
loadModels();
