// raylm playground: calls this server's own routes (same origin only; see the page's Content-Security-Policy).
"use strict";

(function () {
  const KEY_STORAGE = "raylm.apiKey";
  // The app's routes sit beside the page: "/playground" -> "/", "/prefix/playground" -> "/prefix/".
  const base = window.location.pathname.replace(/playground\/?$/, "");
  const byId = (id) => document.getElementById(id);
  const keyInput = byId("api-key");

  function headers(json) {
    const result = json ? { "Content-Type": "application/json" } : {};
    const key = keyInput.value.trim();
    if (key) result.Authorization = "Bearer " + key;
    return result;
  }

  // The server's own words: {"error": "..."} on the task routes, {"error": {"message", "code"}} on OpenAI's.
  async function errorText(response) {
    let message = "";
    const raw = await response.text();
    try {
      const body = JSON.parse(raw);
      const error = body.error !== undefined ? body.error : body.detail;
      if (typeof error === "string") message = error;
      else if (error && typeof error === "object") {
        message = error.message || JSON.stringify(error);
        if (error.code) message += " (" + error.code + ")";
      } else message = raw;
    } catch (_) {
      message = raw || response.statusText;
    }
    let text = "HTTP " + response.status + ": " + message;
    const retryAfter = response.headers.get("Retry-After");
    if (retryAfter) text += " (retry after " + retryAfter + " s)";
    return text;
  }

  function showError(name, text) {
    const box = byId(name + "-error");
    box.textContent = text || "";
    box.hidden = !text;
  }

  function showMetrics(name, parts) {
    byId(name + "-metrics").textContent = parts.filter(Boolean).join(" · ");
  }

  function batchSize(response) {
    const size = response.headers.get("X-Raylm-Batch-Size");
    return "batch size " + (size === null ? "n/a" : size);
  }

  function lines(id) {
    return byId(id).value.split("\n").map((line) => line.trim()).filter((line) => line.length > 0);
  }

  // ------------------------------------------------------------------ task routes

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function renderSentiment(item, result) {
    const li = el("li");
    const meter = el("meter");
    meter.min = 0;
    meter.max = 1;
    meter.value = result.score;
    meter.title = "score " + result.score;
    li.append(el("strong", "", result.label), " ", meter, " ", el("span", "score", Number(result.score).toFixed(3)),
              " ", el("span", "input", item.text));
    li.dataset.label = result.label;
    li.dataset.score = String(result.score);
    return li;
  }

  function renderAnswer(item, result) {
    const li = el("li");
    const answer = el("div", "answer", result.answer);
    li.dataset.answer = result.answer;
    const context = el("blockquote");
    const at = result.answer ? item.context.toLowerCase().indexOf(result.answer.toLowerCase()) : -1;
    if (at >= 0) {
      const end = at + result.answer.length;
      context.append(item.context.slice(0, at), el("mark", "", item.context.slice(at, end)), item.context.slice(end));
    } else {
      context.textContent = item.context;
      answer.append(" ", el("em", "", "(not found in the context)"));
    }
    li.append(el("div", "input", item.question), answer, context);
    return li;
  }

  function renderTranslation(item, result) {
    const li = el("li");
    li.dataset.translation = result.translation;
    li.append(el("div", "input", item.text), el("div", "answer", result.translation));
    return li;
  }

  const TASKS = {
    sentiment: { inputs: () => lines("sentiment-text").map((text) => ({ text })), render: renderSentiment },
    qa: {
      inputs: () => {
        const context = byId("qa-context").value.trim();
        return lines("qa-question").map((question) => ({ context, question }));
      },
      render: renderAnswer,
    },
    translate: { inputs: () => lines("translate-text").map((text) => ({ text })), render: renderTranslation },
  };

  async function runTask(name) {
    const task = TASKS[name];
    const items = task.inputs();
    const list = byId(name + "-results");
    if (!items.length) return;
    showError(name, "");
    showMetrics(name, ["waiting…"]);
    const body = items.length === 1 ? items[0] : { inputs: items };
    const started = performance.now();
    let response;
    try {
      response = await fetch(base + "v1/" + name, { method: "POST", headers: headers(true), body: JSON.stringify(body) });
    } catch (err) {
      list.replaceChildren();
      showMetrics(name, []);
      showError(name, "network error: " + err.message);
      return;
    }
    if (!response.ok) {
      list.replaceChildren();
      showError(name, await errorText(response));
      showMetrics(name, ["latency " + Math.round(performance.now() - started) + " ms"]);
      return;
    }
    const payload = await response.json();
    const latency = performance.now() - started;
    const results = items.length === 1 ? [payload] : payload.results;
    list.replaceChildren(...results.map((result, index) => task.render(items[index], result)));
    showMetrics(name, ["latency " + Math.round(latency) + " ms", items.length + " input" + (items.length === 1 ? "" : "s"),
      batchSize(response)]);
  }

  // ------------------------------------------------------------------ chat and completions

  let controller = null;

  async function loadModels() {
    const select = byId("chat-model");
    let response;
    try {
      response = await fetch(base + "v1/models", { headers: headers(false) });
    } catch (err) {
      showError("chat", "network error: " + err.message);
      return;
    }
    if (!response.ok) {
      showError("chat", "models: " + (await errorText(response)));
      return;
    }
    showError("chat", "");
    const previous = select.value;
    const models = (await response.json()).data || [];
    select.replaceChildren(...models.map((model) => {
      const option = el("option", "", model.id + (model.tasks ? " (" + model.tasks.join(", ") + ")" : ""));
      option.value = model.id;
      return option;
    }));
    if (models.some((model) => model.id === previous)) select.value = previous;
  }

  function generationBody() {
    const route = document.querySelector("input[name=route]:checked").value;
    const prompt = byId("chat-prompt").value;
    const body = { model: byId("chat-model").value || undefined, stream: byId("chat-stream").checked };
    const number = (id) => (byId(id).value === "" ? undefined : Number(byId(id).value));
    body.temperature = number("chat-temperature");
    body.top_p = number("chat-top-p");
    body.max_tokens = number("chat-max-tokens");
    body.seed = number("chat-seed");
    const stops = byId("chat-stop-strings").value.split("|").filter((stop) => stop.length > 0);
    if (stops.length) body.stop = stops;
    if (body.stream) body.stream_options = { include_usage: true };
    if (route === "chat") {
      const system = byId("chat-system").value.trim();
      body.messages = (system ? [{ role: "system", content: system }] : []).concat([{ role: "user", content: prompt }]);
    } else {
      body.prompt = prompt;
    }
    return { route, body };
  }

  function setRunning(running) {
    byId("chat-send").disabled = running;
    byId("chat-stop").disabled = !running;
  }

  async function runGeneration() {
    const { route, body } = generationBody();
    const output = byId("chat-output");
    const status = byId("chat-status");
    output.replaceChildren();
    showError("chat", "");
    showMetrics("chat", []);
    status.textContent = "waiting…";
    controller = new AbortController();
    setRunning(true);
    const started = performance.now();
    let firstToken = null;
    let pieces = 0;
    let usage = null;
    let finish = null;
    let response = null;
    const path = route === "chat" ? "v1/chat/completions" : "v1/completions";
    const metrics = () => {
      const tokens = usage ? usage.completion_tokens + " tokens (prompt " + usage.prompt_tokens + ")"
        : pieces + (pieces === 1 ? " piece" : " pieces");
      return ["latency " + Math.round(performance.now() - started) + " ms",
        firstToken === null ? null : "first token " + Math.round(firstToken) + " ms", tokens,
        response ? batchSize(response) : null];
    };
    try {
      response = await fetch(base + path, { method: "POST", headers: headers(true), body: JSON.stringify(body),
        signal: controller.signal });
      if (!response.ok) {
        status.textContent = "";
        showError("chat", await errorText(response));
        return;
      }
      status.textContent = "answering…";
      if (!body.stream) {
        const payload = await response.json();
        const choice = payload.choices[0];
        output.textContent = route === "chat" ? choice.message.content : choice.text;
        usage = payload.usage;
        finish = choice.finish_reason;
      } else {
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "";
        let done = false;
        while (!done) {
          const chunk = await reader.read();
          if (chunk.done) break;
          buffer += decoder.decode(chunk.value, { stream: true });
          let end;
          while ((end = buffer.indexOf("\n\n")) >= 0) {
            const event = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            const data = event.split("\n").filter((line) => line.startsWith("data:"))
              .map((line) => line.slice(5).trim()).join("\n");
            if (!data) continue;
            if (data === "[DONE]") { done = true; break; }
            const payload = JSON.parse(data);
            if (payload.error) { showError("chat", "stream error: " + (payload.error.message || data)); continue; }
            if (payload.usage) usage = payload.usage;
            for (const choice of payload.choices || []) {
              const text = route === "chat" ? (choice.delta && choice.delta.content) || "" : choice.text || "";
              if (text) {
                if (firstToken === null) firstToken = performance.now() - started;
                pieces += 1;
                output.append(text);  // one text node per piece: the answer grows as it arrives
              }
              if (choice.finish_reason) finish = choice.finish_reason;
            }
          }
        }
      }
      status.textContent = "done" + (finish ? " (finish reason: " + finish + ")" : "");
      showMetrics("chat", metrics());
    } catch (err) {
      if (err.name === "AbortError") {
        status.textContent = "stopped";
        showMetrics("chat", metrics());
      } else {
        status.textContent = "";
        showError("chat", "network error: " + err.message);
      }
    } finally {
      controller = null;
      setRunning(false);
    }
  }

  // ------------------------------------------------------------------ wiring

  keyInput.value = sessionStorage.getItem(KEY_STORAGE) || "";
  keyInput.addEventListener("input", () => sessionStorage.setItem(KEY_STORAGE, keyInput.value));
  keyInput.addEventListener("change", loadModels);
  keyInput.addEventListener("keydown", (event) => { if (event.key === "Enter") loadModels(); });

  for (const name of Object.keys(TASKS)) {
    byId(name + "-form").addEventListener("submit", (event) => { event.preventDefault(); runTask(name); });
  }
  byId("chat-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (!controller) runGeneration();
  });
  byId("chat-stop").addEventListener("click", () => { if (controller) controller.abort(); });

  // In a text box Enter sends its form; Shift+Enter starts a new line.
  for (const area of document.querySelectorAll("textarea")) {
    area.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        area.form.requestSubmit();
      }
    });
  }
  loadModels();
})();
